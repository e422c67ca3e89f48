//! Registration of service instances (Kratos's Registrar), driven by the host.
//!
//! The provider (a component exporting `wasd:provider/registrar`) knows the registry's
//! protocol; the host owns the lifecycle: register, keep the lease alive every third of
//! its TTL, register again whenever the lease is lost, for as long as it takes (with
//! capped, jittered back-off: Kratos gives up after 5 retries, we never do), and
//! deregister on shutdown. The host keeps the lease id, so a provider instance that
//! traps or is reloaded loses nothing.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::error::{Error, ProviderError, ProviderErrorKind};
use crate::metrics;
use crate::source::Source;

/// Finds the registrar of the chain serving now; `None` once the resolver is gone.
pub type RegistrarSource = Arc<dyn Fn() -> Option<Arc<dyn Source>> + Send + Sync>;

/// Lease TTL when none is given: Kratos's default.
pub const DEFAULT_REGISTRATION_TTL: Duration = Duration::from_secs(15);
/// Shortest TTL etcd accepts.
const MIN_TTL: Duration = Duration::from_secs(1);
/// Retry back-off after a failed registration: 0.5 s doubling to 30 s, each delay
/// ±20 %, so that many instances restarting together do not retry in step.
pub const REGISTRATION_BACKOFF: (Duration, Duration) = (Duration::from_millis(500), Duration::from_secs(30));
const REGISTRATION_JITTER: f64 = 0.2;
/// How long deregistering may take on shutdown.
const DEREGISTER_TIMEOUT: Duration = Duration::from_secs(5);

/// A service instance, as Kratos's registry describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceInstance {
    /// Unique per instance; [`ServiceInstance::new`] makes a random UUID.
    pub id: String,
    /// The service name (`hello`).
    pub name: String,
    /// The instance's version (`v2`); may be empty.
    pub version: String,
    /// Free-form metadata; discovery exposes it on every endpoint.
    pub metadata: BTreeMap<String, String>,
    /// URLs such as `grpc://10.0.0.1:9000` and `http://10.0.0.1:8000`.
    pub endpoints: Vec<String>,
}

impl ServiceInstance {
    /// An instance of `name` with a random id and no version or metadata.
    pub fn new(name: impl Into<String>, endpoints: impl IntoIterator<Item = impl Into<String>>) -> Self {
        ServiceInstance {
            id: random_uuid(),
            name: name.into(),
            version: String::new(),
            metadata: BTreeMap::new(),
            endpoints: endpoints.into_iter().map(Into::into).collect(),
        }
    }

    /// Check what a registry key and a Kratos client need.
    pub fn validate(&self) -> Result<(), Error> {
        let invalid = |reason: String| Error::InvalidInstance {
            service: self.name.clone(),
            reason,
        };
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 253
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        };
        // Kratos uses the name verbatim in the key; any case is fine.
        if !name_ok(&self.name) {
            return Err(invalid(
                "the service name must be letters, digits, '-', '.' or '_'".into(),
            ));
        }
        if !name_ok(&self.id) {
            return Err(invalid(format!(
                "the id '{}' must be letters, digits, '-', '.' or '_'",
                self.id.escape_default()
            )));
        }
        if self.endpoints.is_empty() {
            return Err(invalid("an instance needs at least one endpoint".into()));
        }
        for url in &self.endpoints {
            let scheme_ok = url.split_once("://").is_some_and(|(scheme, rest)| {
                !rest.is_empty()
                    && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                    && scheme
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
            });
            if !scheme_ok || url.chars().any(char::is_whitespace) {
                return Err(invalid(format!(
                    "'{}' is not an endpoint URL like \"http://10.0.0.1:8000\"",
                    url.escape_default()
                )));
            }
        }
        Ok(())
    }
}

impl fmt::Display for ServiceInstance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.name, self.id)
    }
}

/// A random version-4 UUID, as Kratos uses for instance ids.
fn random_uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Where a registration stands.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RegistrationState {
    /// The first attempt is under way.
    Registering,
    /// Written under a live lease.
    Registered {
        /// The registry's lease id.
        lease: String,
    },
    /// The registry could not be reached or refused; trying again (for ever).
    Retrying {
        /// The last failure.
        error: String,
        /// Failed attempts in a row.
        attempts: u32,
        /// When the next attempt starts.
        retry_in: Duration,
    },
    /// Deregistered, or stopped.
    Stopped,
}

/// A live registration: the host keeps the instance registered until
/// [`Registration::deregister`] is called or the value is dropped (which deregisters in
/// the background).
pub struct Registration {
    instance: ServiceInstance,
    provider: String,
    state: watch::Receiver<RegistrationState>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), ProviderError>>>,
}

impl Registration {
    /// `current` finds the registrar in the chain serving now (after a reload it is a
    /// new provider); `provider` is the one to start with.
    pub fn start(
        provider: Arc<dyn Source>,
        current: RegistrarSource,
        instance: ServiceInstance,
        ttl: Duration,
    ) -> Result<Self, Error> {
        instance.validate()?;
        let ttl = ttl.max(MIN_TTL);
        let (state_tx, state) = watch::channel(RegistrationState::Registering);
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let name = provider.name().to_string();
        // Each step (register, keep-alive, deregister) is a provider call under it.
        let span = tracing::debug_span!("registration", service = %instance.name, id = %instance.id);
        let task = tokio::spawn(
            keep_registered(provider, current, instance.clone(), ttl, state_tx, stopped).instrument(span),
        );
        Ok(Registration {
            instance,
            provider: name,
            state,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// The registered instance.
    pub fn instance(&self) -> &ServiceInstance {
        &self.instance
    }

    /// The name of the provider that registers it.
    pub fn provider(&self) -> &str {
        &self.provider
    }

    /// Where the registration stands now.
    pub fn state(&self) -> RegistrationState {
        self.state.borrow().clone()
    }

    /// Wait for the next change of state; `None` once the registration has ended.
    pub async fn changed(&mut self) -> Option<RegistrationState> {
        self.state.changed().await.ok()?;
        Some(self.state.borrow_and_update().clone())
    }

    /// Wait until the instance is registered (at once if it is).
    pub async fn registered(&mut self) -> Result<String, Error> {
        loop {
            if let RegistrationState::Registered { lease } = &*self.state.borrow_and_update() {
                return Ok(lease.clone());
            }
            if self.state.changed().await.is_err() {
                return Err(Error::InvalidInstance {
                    service: self.instance.name.clone(),
                    reason: "the registration stopped before it succeeded".into(),
                });
            }
        }
    }

    /// Stop keeping the lease alive, delete the instance and revoke the lease.
    pub async fn deregister(mut self) -> Result<(), Error> {
        self.stop.take();
        let task = self.task.take().expect("the task runs until deregister");
        match task.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(failure)) => Err(Error::Deregister(failure)),
            Err(e) => Err(Error::engine("run the registration task", e)),
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        // Closing the stop channel makes the task deregister on its own.
        self.stop.take();
    }
}

async fn keep_registered(
    mut provider: Arc<dyn Source>,
    current: RegistrarSource,
    instance: ServiceInstance,
    ttl: Duration,
    state: watch::Sender<RegistrationState>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> Result<(), ProviderError> {
    let mut state = Tracked::new(state, &instance.name);
    let guest = &instance;
    let mut lease: Option<String> = None;
    let mut backoff =
        Backoff::new(REGISTRATION_BACKOFF.0, REGISTRATION_BACKOFF.1).with_jitter(REGISTRATION_JITTER);
    // Each step uses the registrar serving now, so a reloaded provider (new
    // settings, new credentials) takes over and the old one can be freed.
    let refresh = |provider: &mut Arc<dyn Source>| {
        if let Some(now) = current() {
            *provider = now;
        }
    };
    'register: loop {
        refresh(&mut provider);
        let registered = {
            let registering = provider.register(guest, ttl);
            tokio::pin!(registering);
            tokio::select! {
                r = &mut registering => r,
                _ = &mut stop => {
                    // The write may already be on its way: let it land, so that the
                    // deregistration below removes it instead of racing it.
                    if let Ok(Ok(granted)) = tokio::time::timeout(DEREGISTER_TIMEOUT, registering).await {
                        lease = Some(granted);
                    }
                    break 'register;
                }
            }
        };
        match registered {
            Ok(granted) => {
                tracing::info!(provider = %provider.name(), %instance, lease = %granted, ?ttl, "registered");
                state.send(RegistrationState::Registered {
                    lease: granted.clone(),
                });
                lease = Some(granted);
                backoff.reset();
            }
            Err(failure) => {
                metrics::count_registration_retry();
                let retry_in = backoff.next_delay();
                let attempts = backoff.attempts();
                tracing::warn!(%instance, attempts, ?retry_in, "registration failed; retrying: {failure}");
                state.send(RegistrationState::Retrying {
                    error: failure.to_string(),
                    attempts,
                    retry_in,
                });
                tokio::select! {
                    _ = tokio::time::sleep(retry_in) => continue 'register,
                    _ = &mut stop => break 'register,
                }
            }
        }
        // Keep the lease alive. A failed keep-alive is retried until the lease must
        // have expired; then the instance is registered again under a new one.
        let mut last_alive = Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(ttl / 3) => {}
                _ = &mut stop => break 'register,
            }
            refresh(&mut provider);
            let current = lease.as_deref().expect("registered above");
            let alive = tokio::select! {
                r = provider.keep_alive(guest, current) => r,
                _ = &mut stop => break 'register,
            };
            match alive {
                Ok(true) => last_alive = Instant::now(),
                Ok(false) => {
                    tracing::warn!(
                        %instance,
                        lease = %current,
                        "the registry lost the lease or the instance; registering again"
                    );
                    // The old lease may still live (the key was deleted by hand): let
                    // it go rather than keep it alive for nothing.
                    let _ = provider.deregister(guest, Some(current)).await;
                    lease = None;
                    state.send(RegistrationState::Registering);
                    continue 'register;
                }
                Err(failure) if last_alive.elapsed() >= ttl => {
                    metrics::count_registration_retry();
                    tracing::warn!(%instance, "keep-alive failing past the TTL; registering again: {failure}");
                    lease = None;
                    state.send(RegistrationState::Retrying {
                        error: failure.to_string(),
                        attempts: 1,
                        retry_in: Duration::ZERO,
                    });
                    continue 'register;
                }
                Err(failure) => {
                    metrics::count_registration_retry();
                    tracing::warn!(%instance, "keep-alive failed: {failure}");
                }
            }
        }
    }
    refresh(&mut provider);
    let result = match tokio::time::timeout(DEREGISTER_TIMEOUT, provider.deregister(guest, lease.as_deref()))
        .await
    {
        Ok(result) => result,
        Err(_) => Err(ProviderError::new(
            &**provider.name(),
            ProviderErrorKind::Unavailable(format!("deregistering took longer than {DEREGISTER_TIMEOUT:?}")),
        )),
    };
    match &result {
        Ok(()) => tracing::info!(%instance, "deregistered"),
        Err(failure) => tracing::warn!(%instance, "deregistration failed: {failure}"),
    }
    state.send(RegistrationState::Stopped);
    result
}

/// A registration's state sender that keeps `wasd_registrations{service,state}` in
/// step: one registration counts in the gauge of its current state, none once stopped.
struct Tracked {
    sender: watch::Sender<RegistrationState>,
    service: String,
    label: Option<&'static str>,
}

impl Tracked {
    fn new(sender: watch::Sender<RegistrationState>, service: &str) -> Tracked {
        let mut tracked = Tracked {
            sender,
            service: service.to_owned(),
            label: None,
        };
        tracked.count(Some("registering"));
        tracked
    }

    fn send(&mut self, state: RegistrationState) {
        self.count(match &state {
            RegistrationState::Registering => Some("registering"),
            RegistrationState::Registered { .. } => Some("registered"),
            RegistrationState::Retrying { .. } => Some("retrying"),
            RegistrationState::Stopped => None,
        });
        self.sender.send_replace(state);
    }

    fn count(&mut self, label: Option<&'static str>) {
        let gauge = |state: &'static str| ::metrics::gauge!(metrics::names::REGISTRATIONS, "service" => self.service.clone(), "state" => state);
        if let Some(old) = self.label {
            gauge(old).decrement(1.0);
        }
        if let Some(new) = label {
            gauge(new).increment(1.0);
        }
        self.label = label;
    }
}

impl Drop for Tracked {
    /// A task that ends without `Stopped` (its runtime shut down) leaves the gauge too.
    fn drop(&mut self) {
        self.count(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_look_like_uuids() {
        let id = random_uuid();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert_ne!(id, random_uuid());
    }

    #[test]
    fn instances_are_validated() {
        let ok = ServiceInstance::new("hello", ["http://127.0.0.1:8000"]);
        assert!(ok.validate().is_ok());
        // Kratos takes names verbatim, mixed case included.
        assert!(
            ServiceInstance::new("Hello.World_v2", ["grpc://10.0.0.1:9000"])
                .validate()
                .is_ok()
        );
        for (bad, why) in [
            (ServiceInstance::new("", ["http://a:1"]), "service name"),
            (ServiceInstance::new("a/b", ["http://a:1"]), "service name"),
            (
                ServiceInstance::new("hello", Vec::<String>::new()),
                "at least one",
            ),
            (
                ServiceInstance::new("hello", ["127.0.0.1:80"]),
                "not an endpoint URL",
            ),
            (
                ServiceInstance {
                    id: "x/y".into(),
                    ..ServiceInstance::new("hello", ["http://a:1"])
                },
                "the id",
            ),
        ] {
            let e = bad.validate().unwrap_err().to_string();
            assert!(e.contains(why), "{e}");
        }
    }
}
