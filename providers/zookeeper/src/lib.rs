//! The zookeeper provider: Kratos-compatible discovery, watch and registration in
//! ZooKeeper, over TCP (`wasi:sockets`, which the host lets through only to the
//! addresses in the provider's `grants.tcp`).
//!
//! Instances are ephemeral znodes `{root}/{service}/{id}` (root `/microservices`), each
//! holding a Kratos ServiceInstance in JSON, as Kratos's `contrib/registry/zookeeper`
//! writes them. A query for `hello` reads the children of `{root}/hello` and their data.
//! Answers carry a version made of the service node's `pzxid` (the last child added or
//! removed) and the newest `mzxid` among the children (the last data change); `watch`
//! reads again with child and data watches set, and returns as soon as one fires and
//! the version moved.
//!
//! Registration: the ZooKeeper session is the lease. `register` opens a session whose
//! timeout is the TTL and creates the ephemeral node in it; the lease handed to the host
//! is the session's id and password, so `keep-alive` (from any instance of the
//! provider) resumes the session on a new connection, which renews it, and checks the
//! node is still owned by it. A session that expired means "register again".
//! `deregister` deletes the node if the session still owns it and closes the session.

mod client;
// The wire format: pure parsers, also compiled into the fuzz targets (fuzz/) by path.
mod jute;

use std::cell::{Cell, RefCell};
use std::time::{Duration, Instant};

use serde::Deserialize;
use wasd_registry::{Instance, credentials, matches_name, parse_duration, parse_size, push_endpoints};
use wasd_sdk::{Configuration, Endpoint, Error, Provider, Query, Registrar, Resolution, ServiceInstance};

use crate::client::{Connection, Dial, Fault, Session};
use crate::jute::{Acl, PERM_ALL, code};

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Settings {
    /// `host:port` of each server, tried in order: `127.0.0.1:2181`. Each must also be
    /// in `grants.tcp`.
    servers: Vec<String>,
    #[serde(default = "default_root")]
    root: String,
    /// Connecting and each request ("500ms", "2s"); keep it under the provider's time
    /// limit.
    timeout: Option<String>,
    /// The session timeout asked for the connection discovery reads and watches on
    /// ("10s"); registrations use the host's TTL.
    session_timeout: Option<String>,
    /// Digest ACL, as Kratos's `WithDigestACL(user, password)`: nodes created with
    /// `digest:user:…` all permissions, and every connection authenticated.
    user: Option<String>,
    password: Option<String>,
    /// Read the password from this (granted) environment variable instead.
    password_env: Option<String>,
    /// Largest packet read ("16MiB"): a service whose children list is past it is an
    /// error naming this setting.
    max_response: Option<String>,
}

fn default_root() -> String {
    "/microservices".into()
}

/// ZooKeeper's own default `jute.maxbuffer` is 1 MiB per node; a children list of
/// 100 000 instances is about 4 MiB.
const DEFAULT_MAX_RESPONSE: usize = 16 << 20;

struct ZooKeeper {
    servers: Vec<String>,
    root: String,
    timeout: Duration,
    session_timeout_ms: i32,
    /// `user:password`, for `addauth digest`.
    auth: Option<String>,
    acl: Vec<Acl>,
    max_response: usize,
    /// The server that answered last: the first one tried next.
    last_good: Cell<usize>,
    /// The session discovery reads and watches on, kept between calls (an instance
    /// serves one call at a time): a new session per query would be a write through
    /// the ZooKeeper leader each time.
    reader: RefCell<Option<Connection>>,
}

impl ZooKeeper {
    fn dial(&self) -> Dial<'_> {
        Dial {
            servers: &self.servers,
            first: self.last_good.get(),
            timeout: self.timeout,
            auth: self.auth.as_deref(),
            max_packet: self.max_response,
        }
    }

    fn open(&self, session: &Session) -> Result<Connection, Fault> {
        let connection = Connection::open(&self.dial(), session)?;
        self.last_good.set(connection.index);
        Ok(connection)
    }

    fn service_path(&self, service: &str) -> String {
        format!("{}/{service}", self.root)
    }

    fn instance_path(&self, service: &str, id: &str) -> String {
        format!("{}/{service}/{id}", self.root)
    }

    /// Run `read` on the kept session, or on a new one if there is none or the kept
    /// one has failed (the server went away, or expired the session while no call
    /// came). Only reads go through here, so trying twice is harmless.
    fn reading<T>(&self, mut read: impl FnMut(&mut Connection) -> Result<T, Fault>) -> Result<T, Error> {
        let kept = self.reader.borrow_mut().take();
        let fresh = kept.is_none();
        let mut connection = match kept {
            Some(connection) => connection,
            None => self
                .open(&Session::new(self.session_timeout_ms))
                .map_err(|f| self.failure(None, f))?,
        };
        let result = match read(&mut connection) {
            Err(Fault::Io(reason)) if !fresh => {
                wasd_sdk::debug!(
                    "zookeeper at {}: {reason}; reading on a new session",
                    connection.server
                );
                connection = self
                    .open(&Session::new(self.session_timeout_ms))
                    .map_err(|f| self.failure(None, f))?;
                read(&mut connection)
            }
            result => result,
        };
        match result {
            Ok(value) => {
                *self.reader.borrow_mut() = Some(connection);
                Ok(value)
            }
            Err(fault) => {
                let server = connection.server.clone();
                // A connection that failed is not kept; one whose request the server
                // refused (an ACL, say) is fine.
                if matches!(fault, Fault::Code(_)) {
                    *self.reader.borrow_mut() = Some(connection);
                }
                Err(self.failure(Some(&server), fault))
            }
        }
    }

    /// The provider's error for a fault, naming the server (or all of them).
    fn failure(&self, server: Option<&str>, fault: Fault) -> Error {
        let at = match server {
            Some(server) => format!("zookeeper at {server}"),
            None => format!("zookeeper ({})", self.servers.join(", ")),
        };
        match fault {
            Fault::Code(code::NO_AUTH) => Error::Unavailable(format!(
                "{at}: not allowed by the node's ACL (settings.user and password for a digest ACL)"
            )),
            Fault::Code(code::AUTH_FAILED) => Error::Unavailable(format!(
                "{at}: the server refused the digest credentials of settings.user"
            )),
            fault => Error::Unavailable(format!("{at}: {}", fault.describe())),
        }
    }

    /// Every instance of the service, and the answer's version. With `watch`, a child
    /// watch on the service node and a data watch on each instance are left behind.
    fn read(&self, connection: &mut Connection, query: &Query, watch: bool) -> Result<Resolution, Fault> {
        let service = self.service_path(&query.service);
        let Some((children, parent)) = connection.children(&service, watch)? else {
            return Ok(Resolution::new(Vec::new()).with_version("0.0"));
        };
        let paths: Vec<String> = children
            .iter()
            .map(|child| format!("{service}/{child}"))
            .collect();
        let values = connection.get_all(&paths, watch)?;
        let mut newest = 0;
        let mut endpoints = Vec::new();
        for (path, value) in paths.iter().zip(values) {
            // Deleted since the children were listed; the child watch says so.
            let Some((data, stat)) = value else { continue };
            newest = newest.max(stat.mzxid);
            push_endpoints(&data, &query.service, path, &mut endpoints);
        }
        if let Some(name) = &query.endpoint_name {
            endpoints.retain(|e: &Endpoint| matches_name(e, name));
        }
        Ok(Resolution::new(endpoints).with_version(format!("{:x}.{newest:x}", parent.pzxid)))
    }

    /// Create the persistent nodes above `path` that are missing, as Kratos does.
    fn ensure_parents(&self, connection: &mut Connection, path: &str) -> Result<(), Fault> {
        let mut at = 0;
        while let Some(next) = path[at + 1..].find('/') {
            at += 1 + next;
            match connection.create(&path[..at], b"", &self.acl, 0) {
                Ok(()) | Err(Fault::Code(code::NODE_EXISTS)) => {}
                Err(fault) => return Err(fault),
            }
        }
        Ok(())
    }
}

impl Provider for ZooKeeper {
    fn configure(config: Configuration) -> Result<Self, Error> {
        let settings: Settings = serde_json::from_str(&config.settings)
            .map_err(|e| Error::InvalidSettings(format!("settings: {e}")))?;
        if settings.servers.is_empty() {
            return Err(Error::InvalidSettings(
                "settings.servers: give at least one ZooKeeper server, like \"127.0.0.1:2181\"".into(),
            ));
        }
        for server in &settings.servers {
            let port = server.rsplit_once(':').and_then(|(host, port)| {
                (!host.is_empty()).then_some(())?;
                port.parse::<u16>().ok().filter(|p| *p > 0)
            });
            if port.is_none() {
                return Err(Error::InvalidSettings(format!(
                    "settings.servers: '{server}' is not a host:port like \"127.0.0.1:2181\""
                )));
            }
        }
        let root = settings.root.trim_end_matches('/').to_owned();
        if !root.starts_with('/') || root.contains("//") {
            return Err(Error::InvalidSettings(format!(
                "settings.root: '{}' must be an absolute ZooKeeper path like \"/microservices\"",
                settings.root
            )));
        }
        let duration = |key: &str, value: &Option<String>, default: Duration| match value {
            None => Ok(default),
            Some(t) => parse_duration(t).filter(|d| !d.is_zero()).ok_or_else(|| {
                Error::InvalidSettings(format!(
                    "settings.{key}: '{t}' is not a positive duration like \"2s\""
                ))
            }),
        };
        let timeout = duration("timeout", &settings.timeout, Duration::from_millis(500))?;
        let session_timeout = duration(
            "session-timeout",
            &settings.session_timeout,
            Duration::from_secs(10),
        )?;
        let max_response = match &settings.max_response {
            None => DEFAULT_MAX_RESPONSE,
            Some(t) => parse_size(t).ok_or_else(|| {
                Error::InvalidSettings(format!(
                    "settings.max-response: '{t}' is not a size like \"16MiB\" or \"512KiB\""
                ))
            })?,
        };
        let credentials = credentials(settings.user, settings.password, settings.password_env, "user")?;
        let acl = match &credentials {
            Some((user, password)) => vec![Acl {
                perms: PERM_ALL,
                scheme: "digest".into(),
                id: digest_id(user, password),
            }],
            None => Acl::open(),
        };
        Ok(ZooKeeper {
            servers: settings.servers,
            root,
            timeout,
            session_timeout_ms: i32::try_from(session_timeout.as_millis()).unwrap_or(i32::MAX),
            auth: credentials.map(|(user, password)| format!("{user}:{password}")),
            acl,
            max_response,
            last_good: Cell::new(0),
            reader: RefCell::new(None),
        })
    }

    fn resolve(&self, query: Query) -> Result<Resolution, Error> {
        self.reading(|connection| self.read(connection, &query, false))
    }

    fn watch(&self, query: Query, version: String, timeout_ms: u64) -> Result<Option<Resolution>, Error> {
        let deadline = Instant::now() + Duration::from_millis(timeout_ms);
        let service = self.service_path(&query.service);
        self.reading(|connection| {
            loop {
                // Read with watches set; a change since `version` (made before the
                // watches were) shows in the version itself.
                let answer = self.read(connection, &query, true)?;
                if answer.version.as_deref() != Some(version.as_str()) {
                    return Ok(Some(answer));
                }
                // Wait for a watch on this service to fire; others (left by earlier
                // calls for other services on this session) are stale: those calls
                // compare versions when they come again.
                loop {
                    match connection.next_event(deadline)? {
                        None => return Ok(None),
                        Some(event)
                            if event.path == service || event.path.starts_with(&format!("{service}/")) =>
                        {
                            break;
                        }
                        Some(_) => {}
                    }
                }
            }
        })
    }
}

impl Registrar for ZooKeeper {
    fn register(&self, instance: ServiceInstance, ttl_ms: u64) -> Result<String, Error> {
        let timeout_ms = i32::try_from(ttl_ms).unwrap_or(i32::MAX).max(1);
        let mut connection = self
            .open(&Session::new(timeout_ms))
            .map_err(|f| self.failure(None, f))?;
        let server = connection.server.clone();
        let path = self.instance_path(&instance.name, &instance.id);
        let value = Instance {
            id: instance.id,
            name: instance.name,
            version: instance.version,
            metadata: instance.metadata.into_iter().collect(),
            endpoints: instance.endpoints,
        }
        .to_json();
        let session = connection.session.id;
        let mut create = || -> Result<(), Fault> {
            self.ensure_parents(&mut connection, &path)?;
            for _ in 0..3 {
                match connection.create(&path, &value, &self.acl, jute::EPHEMERAL) {
                    Err(Fault::Code(code::NODE_EXISTS)) => {}
                    result => return result,
                }
                // Left by an earlier session of this instance (not yet expired), or
                // another process with the same id: the newest registration wins, as a
                // put over the key does in etcd.
                match connection.exists(&path, false)? {
                    // Ours: an earlier attempt of this call did create it.
                    Some(stat) if stat.ephemeral_owner == session => return Ok(()),
                    Some(stat) => match connection.delete(&path, stat.version) {
                        Ok(()) | Err(Fault::Code(code::NO_NODE | code::BAD_VERSION)) => {}
                        Err(fault) => return Err(fault),
                    },
                    None => {}
                }
            }
            Err(Fault::Io(format!(
                "{path} is being created and deleted by someone else"
            )))
        };
        create().map_err(|f| self.failure(Some(&server), f))?;
        // The connection closes without ending the session: the session lives on for
        // its timeout, renewed by each keep-alive.
        Ok(connection.session.to_lease())
    }

    fn keep_alive(&self, instance: ServiceInstance, lease: String) -> Result<bool, Error> {
        let session = Session::from_lease(&lease)
            .ok_or_else(|| Error::InvalidQuery(format!("'{lease}' is not a ZooKeeper session lease")))?;
        // Resuming the session on a new connection renews it.
        let mut connection = match self.open(&session) {
            Ok(connection) => connection,
            Err(Fault::Expired) => return Ok(false),
            Err(fault) => return Err(self.failure(None, fault)),
        };
        let path = self.instance_path(&instance.name, &instance.id);
        let stat = connection
            .exists(&path, false)
            .map_err(|f| self.failure(Some(&connection.server), f))?;
        // Deleted by hand, or taken over by a successor with the same id: register again.
        Ok(stat.is_some_and(|stat| stat.ephemeral_owner == session.id))
    }

    fn deregister(&self, instance: ServiceInstance, lease: Option<String>) -> Result<(), Error> {
        let path = self.instance_path(&instance.name, &instance.id);
        let session = match &lease {
            Some(lease) => Session::from_lease(lease)
                .ok_or_else(|| Error::InvalidQuery(format!("'{lease}' is not a ZooKeeper session lease")))?,
            None => Session::new(self.session_timeout_ms),
        };
        let mut connection = match self.open(&session) {
            Ok(connection) => connection,
            // The session, and its ephemeral node with it, are gone already.
            Err(Fault::Expired) => return Ok(()),
            Err(fault) => return Err(self.failure(None, fault)),
        };
        let server = connection.server.clone();
        let mut delete = || -> Result<(), Fault> {
            match lease {
                // Only if still ours: a successor with the same id stays.
                Some(_) => {
                    if let Some(stat) = connection.exists(&path, false)?
                        && stat.ephemeral_owner == session.id
                    {
                        connection.delete(&path, stat.version)?;
                    }
                }
                None => connection.delete(&path, -1)?,
            }
            Ok(())
        };
        match delete() {
            Ok(()) | Err(Fault::Code(code::NO_NODE | code::BAD_VERSION)) => {}
            Err(fault) => return Err(self.failure(Some(&server), fault)),
        }
        connection
            .close_session()
            .map_err(|f| self.failure(Some(&server), f))
    }
}

/// The identity a digest ACL names: `user:base64(sha1(user:password))`, as
/// `DigestAuthenticationProvider.generateDigest` makes it.
fn digest_id(user: &str, password: &str) -> String {
    use base64::Engine;
    let hash = sha1_smol::Sha1::from(format!("{user}:{password}"))
        .digest()
        .bytes();
    format!(
        "{user}:{}",
        base64::engine::general_purpose::STANDARD.encode(hash)
    )
}

wasd_sdk::export!(ZooKeeper, registrar);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_ids_match_zookeepers_generate_digest() {
        // `DigestAuthenticationProvider.generateDigest("super:test")`, from the
        // ZooKeeper administrator's guide.
        assert_eq!(digest_id("super", "test"), "super:D/InIHSb7yEEbrWz8b9l71RjZJU=");
    }
}
