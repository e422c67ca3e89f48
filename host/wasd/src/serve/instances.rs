//! Instances registered through the HTTP API (`PUT /v1/instances/SERVICE/ID`): each is
//! a [`Registration`] with the registrar provider (its lease kept alive by the host),
//! held as long as the client repeats the PUT within the instance's TTL, a TTL check
//! as Consul's. One not renewed in time is deregistered; so is every one when the
//! server stops.

use std::collections::HashMap;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::{Error, Registration, Resolver, ServiceInstance};

/// A PUT's TTL when it names none.
pub(crate) const DEFAULT_TTL: Duration = Duration::from_secs(15);
/// The shortest and longest TTL a PUT may ask for.
const TTL_RANGE: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(3600));

/// A PUT's body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct InstanceBody {
    endpoints: Vec<String>,
    #[serde(default)]
    version: String,
    #[serde(default)]
    metadata: std::collections::BTreeMap<String, String>,
    ttl: Option<String>,
}

impl InstanceBody {
    /// The instance and its TTL; `Err`: why the body is refused.
    pub(crate) fn instance(self, service: &str, id: &str) -> Result<(ServiceInstance, Duration), String> {
        let ttl = match &self.ttl {
            None => DEFAULT_TTL,
            Some(text) => humantime::parse_duration(text).map_err(|e| {
                format!(
                    "ttl '{}' is not a duration like \"15s\" ({e})",
                    text.escape_default()
                )
            })?,
        };
        if !(TTL_RANGE.0..=TTL_RANGE.1).contains(&ttl) {
            return Err(format!(
                "ttl {} is outside 1s..1h",
                humantime::format_duration(ttl)
            ));
        }
        let mut instance = ServiceInstance::new(service, self.endpoints);
        instance.id = id.to_owned();
        instance.version = self.version;
        instance.metadata = self.metadata.into_iter().collect();
        instance.validate().map_err(|e| e.to_string())?;
        Ok((instance, ttl))
    }
}

struct Held {
    registration: Registration,
    ttl: Duration,
    renewed: Instant,
}

/// The instances the API holds, by service and id.
#[derive(Default)]
pub(crate) struct Instances {
    held: Mutex<HashMap<(String, String), Held>>,
}

impl Instances {
    /// Register `instance`, or renew its TTL check if it is held as it is; a held
    /// instance that changed is registered anew. The registration as `/v1/status`
    /// describes it.
    pub(crate) async fn put(
        &self,
        resolver: &Resolver,
        instance: ServiceInstance,
        ttl: Duration,
    ) -> Result<Value, Error> {
        let key = (instance.name.clone(), instance.id.clone());
        let mut held = self.held.lock().await;
        if let Some(current) = held.get_mut(&key)
            && current.registration.instance() == &instance
            && current.ttl == ttl
        {
            current.renewed = Instant::now();
            return Ok(describe(&key, current));
        }
        if let Some(old) = held.remove(&key) {
            deregister(old.registration).await;
        }
        let registration = resolver.register_with_ttl(instance, ttl).await?;
        let current = held.entry(key.clone()).or_insert(Held {
            registration,
            ttl,
            renewed: Instant::now(),
        });
        Ok(describe(&key, current))
    }

    /// Deregister an instance now; `false` when it was not held.
    pub(crate) async fn delete(&self, service: &str, id: &str) -> bool {
        let removed = self
            .held
            .lock()
            .await
            .remove(&(service.to_owned(), id.to_owned()));
        match removed {
            Some(held) => {
                deregister(held.registration).await;
                true
            }
            None => false,
        }
    }

    /// Deregister every instance whose client stopped renewing it.
    pub(crate) async fn expire(&self) {
        let now = Instant::now();
        let expired: Vec<Held> = {
            let mut held = self.held.lock().await;
            let keys: Vec<_> = held
                .iter()
                .filter(|(_, h)| now.duration_since(h.renewed) >= h.ttl)
                .map(|(key, _)| key.clone())
                .collect();
            keys.iter().filter_map(|key| held.remove(key)).collect()
        };
        for held in expired {
            tracing::info!(
                instance = %held.registration.instance(),
                "not renewed within its TTL of {}; deregistering",
                humantime::format_duration(held.ttl)
            );
            deregister(held.registration).await;
        }
    }

    /// Deregister everything (the server is stopping).
    pub(crate) async fn deregister_all(&self) {
        let all: Vec<Held> = self.held.lock().await.drain().map(|(_, held)| held).collect();
        for held in all {
            deregister(held.registration).await;
        }
    }

    /// The instances held, for `/v1/status`.
    pub(crate) async fn status(&self) -> Vec<Value> {
        let held = self.held.lock().await;
        let mut all: Vec<Value> = held.iter().map(|(key, h)| describe(key, h)).collect();
        all.sort_by(|a, b| {
            (a["service"].as_str(), a["id"].as_str()).cmp(&(b["service"].as_str(), b["id"].as_str()))
        });
        all
    }
}

async fn deregister(registration: Registration) {
    let instance = registration.instance().to_string();
    if let Err(e) = registration.deregister().await {
        tracing::warn!(%instance, "deregistering failed: {e}");
    }
}

fn describe((service, id): &(String, String), held: &Held) -> Value {
    let (state, detail) = crate::json::registration_state(&held.registration.state());
    let left = held.ttl.saturating_sub(held.renewed.elapsed());
    let mut value = json!({
        "service": service,
        "id": id,
        "provider": held.registration.provider(),
        "state": state,
        "ttl_ms": held.ttl.as_millis() as u64,
        "expires_in_ms": left.as_millis() as u64,
    });
    if let Some(value) = value.as_object_mut() {
        value.extend(detail);
    }
    value
}
