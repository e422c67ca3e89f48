//! A client for etcd's v3 HTTP/JSON gateway: POST JSON, base64 keys and values, 64-bit
//! numbers as strings, zero values omitted. Fails over between the configured
//! endpoints, and authenticates (and re-authenticates when the token expires) when a
//! user is configured. The token and password never appear in an error or a log line.

use std::cell::{Cell, RefCell};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::Deserialize;
use serde_json::{Value, json};
use wasd_sdk::Error;
use wasd_sdk::http::{HttpError, Request, Response};

/// Largest unary response read by default (a range over a big service):
/// `settings.max-response`.
pub const DEFAULT_MAX_RESPONSE: usize = 16 << 20;

/// The pause between two rounds over the endpoints.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

pub struct Gateway {
    endpoints: Vec<String>,
    /// The endpoint that answered last; tried first.
    current: Cell<usize>,
    pub timeout: Duration,
    /// Largest unary response read (`settings.max-response`).
    max_response: usize,
    /// How long to go on trying the endpoints, round after round, when none answers
    /// (a cluster electing a leader answers nothing for a second or two).
    retry_for: Duration,
    credentials: Option<(String, String)>,
    token: RefCell<Option<String>>,
}

/// Why one endpoint did not answer: worth trying the next one, or not.
enum Failure {
    Unreachable(String),
    Final(Error),
}

impl Gateway {
    pub fn new(
        endpoints: Vec<String>,
        timeout: Duration,
        retry_for: Duration,
        max_response: usize,
        credentials: Option<(String, String)>,
    ) -> Gateway {
        Gateway {
            endpoints,
            current: Cell::new(0),
            timeout,
            max_response,
            retry_for,
            credentials,
            token: RefCell::new(None),
        }
    }

    /// A unary call: the response body of the first endpoint that answers.
    pub fn call(&self, path: &str, body: &Value) -> Result<Vec<u8>, Error> {
        self.with_failover(|endpoint| {
            let response = self.send(endpoint, path, body, None)?;
            response.bytes(self.max_response).map_err(|e| match e {
                // No other member has a shorter answer.
                HttpError::TooLarge(limit) => Failure::Final(Error::Unavailable(format!(
                    "etcd at {endpoint}: the answer to {path} is larger than settings.max-response ({} KiB): \
                     raise it, and limits.max-memory to about three times as much",
                    limit >> 10
                ))),
                e => Failure::Unreachable(format!("etcd at {endpoint}: {e}")),
            })
        })
    }

    /// Open a streaming call (`/v3/watch`) whose body stays open for up to `wait`, on
    /// the first member that answers; that member's index is [`Gateway::current`].
    pub fn stream(&self, path: &str, body: &Value, wait: Duration) -> Result<Response, Error> {
        self.with_failover(|endpoint| self.send(endpoint, path, body, Some(wait)))
    }

    /// The endpoint that answered last (and is tried first).
    pub fn current(&self) -> usize {
        self.current.get()
    }

    /// Start the next call after `member`: it stopped answering mid-stream.
    pub fn skip(&self, member: usize) {
        self.current.set((member + 1) % self.endpoints.len());
    }

    /// Whether `member` answers a status request within the timeout: a watch stream
    /// that stays quiet is either idle or on a member that froze (a partition, a
    /// stopped process), and only a request can tell them apart.
    pub fn probe(&self, member: usize) -> Result<(), String> {
        let endpoint = &self.endpoints[member];
        match self.send(endpoint, "/v3/maintenance/status", &json!({}), None) {
            // A refusal is an answer too: the member is alive.
            Ok(_) | Err(Failure::Final(_)) => Ok(()),
            Err(Failure::Unreachable(e)) => Err(e),
        }
    }

    /// The configured endpoint at `member`, for messages.
    pub fn endpoint(&self, member: usize) -> &str {
        &self.endpoints[member]
    }

    /// How many endpoints there are.
    pub fn members(&self) -> usize {
        self.endpoints.len()
    }

    /// `f` on each endpoint in turn from the current one, until one answers; more
    /// rounds while `retry_for` lasts. Every request here may be repeated: reads,
    /// keep-alives, deletes and puts of the same value are idempotent, and a lease
    /// granted twice leaves an unused one to expire.
    fn with_failover<T>(&self, mut f: impl FnMut(&str) -> Result<T, Failure>) -> Result<T, Error> {
        let n = self.endpoints.len();
        let started = Instant::now();
        loop {
            let mut errors = Vec::new();
            for attempt in 0..n {
                let index = (self.current.get() + attempt) % n;
                match f(&self.endpoints[index]) {
                    Ok(value) => {
                        self.current.set(index);
                        return Ok(value);
                    }
                    Err(Failure::Unreachable(e)) => errors.push(e),
                    Err(Failure::Final(e)) => return Err(e),
                }
            }
            if started.elapsed() + RETRY_PAUSE >= self.retry_for {
                return Err(Error::Unavailable(errors.join("; ")));
            }
            std::thread::sleep(RETRY_PAUSE);
        }
    }

    /// Send one request to one endpoint, authenticating first when needed and once
    /// more when etcd says the token is no longer valid.
    fn send(
        &self,
        endpoint: &str,
        path: &str,
        body: &Value,
        stream: Option<Duration>,
    ) -> Result<Response, Failure> {
        let payload = body.to_string().into_bytes();
        for retry in [false, true] {
            let token = match &self.credentials {
                Some(_) if self.token.borrow().is_none() || retry => Some(self.authenticate(endpoint)?),
                Some(_) => self.token.borrow().clone(),
                None => None,
            };
            let mut request = Request::post(format!("{endpoint}{path}"))
                .header("content-type", "application/json")
                .body(payload.clone())
                .timeout(self.timeout);
            if let Some(wait) = stream {
                // The stream may stay quiet for the whole wait.
                request = request.between_bytes_timeout(wait + self.timeout);
                // etcd's "require leader" (clientv3's WithRequireLeader, forwarded by the
                // gateway as gRPC metadata): a member cut off from its cluster's leader
                // ends the stream with "no leader" instead of going silent, and the
                // watch moves to another member.
                request = request.header("grpc-metadata-hasleader", "true");
            }
            if let Some(token) = &token {
                // etcd wants the bare token, not "Bearer <token>".
                request = request.header("authorization", token.as_bytes());
            }
            let response = request.send().map_err(|e| http_failure(endpoint, e))?;
            if response.status() == 200 {
                return Ok(response);
            }
            let status = response.status();
            let body = response.bytes(64 << 10).unwrap_or_default();
            let message = error_message(&body);
            if self.credentials.is_some() && !retry && is_auth_expired(status, &message) {
                self.token.replace(None);
                continue;
            }
            return Err(match status {
                401 | 403 => Failure::Final(Error::Denied(format!(
                    "etcd at {endpoint} refused {path}: {message}"
                ))),
                500..=599 => Failure::Unreachable(format!(
                    "etcd at {endpoint} failed {path} (HTTP {status}): {message}"
                )),
                _ => Failure::Final(Error::Unavailable(format!(
                    "etcd at {endpoint} refused {path} (HTTP {status}): {message}"
                ))),
            });
        }
        unreachable!("the second attempt always returns")
    }

    fn authenticate(&self, endpoint: &str) -> Result<String, Failure> {
        let (name, password) = self.credentials.as_ref().expect("only called with credentials");
        let body = json!({ "name": name, "password": password }).to_string();
        let response = Request::post(format!("{endpoint}/v3/auth/authenticate"))
            .header("content-type", "application/json")
            .body(body)
            .timeout(self.timeout)
            .send()
            .map_err(|e| http_failure(endpoint, e))?;
        let status = response.status();
        let bytes = response
            .bytes(64 << 10)
            .map_err(|e| Failure::Unreachable(format!("etcd at {endpoint}: {e}")))?;
        if status >= 500 {
            // A sick member (no leader, say): another endpoint may do better.
            return Err(Failure::Unreachable(format!(
                "etcd at {endpoint} could not authenticate (HTTP {status}): {}",
                error_message(&bytes)
            )));
        }
        if status != 200 {
            return Err(Failure::Final(Error::Denied(format!(
                "etcd at {endpoint} refused to authenticate user '{name}': {}",
                error_message(&bytes)
            ))));
        }
        #[derive(Deserialize)]
        struct Authenticated {
            #[serde(default)]
            token: String,
        }
        let token = serde_json::from_slice::<Authenticated>(&bytes)
            .map_err(|e| Failure::Final(malformed(endpoint, "/v3/auth/authenticate", &e)))?
            .token;
        if token.is_empty() {
            return Err(Failure::Final(Error::Unavailable(format!(
                "etcd at {endpoint} returned no token for user '{name}' (is auth enabled?)"
            ))));
        }
        self.token.replace(Some(token.clone()));
        Ok(token)
    }
}

fn http_failure(endpoint: &str, e: HttpError) -> Failure {
    match e {
        HttpError::Denied(_) | HttpError::InvalidUrl(_) => Failure::Final(e.into()),
        e => Failure::Unreachable(format!("etcd at {endpoint}: {e}")),
    }
}

pub fn malformed(endpoint: &str, path: &str, e: &dyn std::fmt::Display) -> Error {
    Error::Unavailable(format!("etcd at {endpoint}: malformed response to {path}: {e}"))
}

/// The message of a gateway error body (`{"error": "...", "code": 16, "message": "..."}`),
/// or the body itself, shortened.
pub fn error_message(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct GatewayError {
        #[serde(default)]
        message: String,
        #[serde(default)]
        error: Value,
    }
    let message = match serde_json::from_slice::<GatewayError>(body) {
        Ok(e) if !e.message.is_empty() => e.message,
        Ok(GatewayError {
            error: Value::String(e),
            ..
        }) => e,
        _ => String::from_utf8_lossy(body).into_owned(),
    };
    shorten(message.trim(), 300)
}

fn is_auth_expired(status: u16, message: &str) -> bool {
    status == 401 || message.contains("invalid auth token") || message.contains("user name is empty")
}

pub fn shorten(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text.to_owned(),
    }
}

pub fn b64(bytes: &[u8]) -> String {
    BASE64.encode(bytes)
}

/// The end of a prefix range: the prefix with its last byte incremented.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // every key
}

/// A 64-bit integer the gateway writes as a string (or, leniently, a number).
fn int64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Int {
        Text(String),
        Number(i64),
    }
    match Int::deserialize(d)? {
        Int::Number(n) => Ok(n),
        Int::Text(t) => t.parse().map_err(serde::de::Error::custom),
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct Header {
    #[serde(default, deserialize_with = "int64")]
    pub revision: i64,
}

#[derive(Debug, Deserialize)]
pub struct RawKeyValue {
    #[serde(default)]
    key: String,
    #[serde(default)]
    value: String,
    #[serde(default, deserialize_with = "int64")]
    lease: i64,
}

/// A key and value, decoded, with the lease the key is attached to (0: none).
#[derive(Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub lease: i64,
}

impl RawKeyValue {
    fn decode(self) -> Result<KeyValue, String> {
        let key = BASE64
            .decode(&self.key)
            .map_err(|e| format!("a key is not valid base64 ({e})"))?;
        let value = BASE64.decode(&self.value).map_err(|e| {
            format!(
                "the value of '{}' is not valid base64 ({e})",
                shorten(&String::from_utf8_lossy(&key), 200)
            )
        })?;
        Ok(KeyValue {
            key,
            value,
            lease: self.lease,
        })
    }
}

/// `/v3/kv/range`'s answer: the revision it was read at and the pairs.
#[derive(Debug, PartialEq, Eq)]
pub struct Range {
    pub revision: i64,
    pub kvs: Vec<KeyValue>,
}

pub fn parse_range(body: &[u8]) -> Result<Range, String> {
    #[derive(Deserialize)]
    struct RangeResponse {
        header: Option<Header>,
        #[serde(default)]
        kvs: Vec<RawKeyValue>,
    }
    let response: RangeResponse =
        serde_json::from_slice(body).map_err(|e| format!("not a range response: {e}"))?;
    let header = response.header.ok_or("a range response without a header")?;
    let kvs = response
        .kvs
        .into_iter()
        .map(RawKeyValue::decode)
        .collect::<Result<_, _>>()?;
    Ok(Range {
        revision: header.revision,
        kvs,
    })
}

/// One message of a `/v3/watch` stream.
#[derive(Debug, PartialEq, Eq)]
pub enum WatchMessage {
    Created,
    /// Something under the prefix changed (or a progress notification: no events).
    Events(usize),
    /// The start revision was compacted away: read everything again.
    Compacted(i64),
    Canceled(String),
    Error(String),
}

pub fn parse_watch_line(line: &[u8]) -> Result<WatchMessage, String> {
    #[derive(Deserialize)]
    struct Line {
        result: Option<WatchResult>,
        error: Option<StreamError>,
    }
    #[derive(Deserialize)]
    struct StreamError {
        #[serde(default)]
        message: String,
    }
    #[derive(Deserialize)]
    struct WatchResult {
        #[serde(default)]
        created: bool,
        #[serde(default)]
        canceled: bool,
        #[serde(default, deserialize_with = "int64")]
        compact_revision: i64,
        #[serde(default)]
        cancel_reason: String,
        #[serde(default)]
        events: Vec<Value>,
    }
    let line: Line = serde_json::from_slice(line).map_err(|e| format!("not a watch response: {e}"))?;
    if let Some(error) = line.error {
        return Ok(WatchMessage::Error(error.message));
    }
    let result = line.result.ok_or("a watch response without a result")?;
    Ok(if result.compact_revision > 0 {
        WatchMessage::Compacted(result.compact_revision)
    } else if result.canceled {
        WatchMessage::Canceled(result.cancel_reason)
    } else if result.created {
        WatchMessage::Created
    } else {
        WatchMessage::Events(result.events.len())
    })
}

/// `/v3/lease/grant`'s lease id.
pub fn parse_lease_grant(body: &[u8]) -> Result<String, String> {
    #[derive(Deserialize)]
    struct Grant {
        #[serde(rename = "ID", default, deserialize_with = "int64")]
        id: i64,
        #[serde(default)]
        error: String,
    }
    let grant: Grant = serde_json::from_slice(body).map_err(|e| format!("not a lease grant: {e}"))?;
    if grant.id == 0 {
        return Err(format!("no lease granted: {}", grant.error));
    }
    Ok(grant.id.to_string())
}

/// `/v3/lease/keepalive`'s first line: whether etcd still knows the lease. etcd
/// answers an unknown lease with HTTP 200 and no (or a zero) TTL.
pub fn parse_keep_alive(line: &[u8]) -> Result<bool, String> {
    #[derive(Deserialize)]
    struct Line {
        result: Option<KeepAlive>,
        error: Option<Value>,
    }
    #[derive(Deserialize)]
    struct KeepAlive {
        #[serde(rename = "TTL", default, deserialize_with = "int64")]
        ttl: i64,
    }
    let line: Line = serde_json::from_slice(line).map_err(|e| format!("not a keep-alive response: {e}"))?;
    if let Some(error) = line.error {
        return Err(format!("keep-alive failed: {error}"));
    }
    Ok(line.result.is_some_and(|r| r.ttl > 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_responses() {
        let body = br#"{"header":{"cluster_id":"1","revision":"12"},"kvs":[{"key":"L20vaGVsbG8vYQ==","value":"e30=","mod_revision":"5","lease":"77"}],"count":"1"}"#;
        let range = parse_range(body).unwrap();
        assert_eq!(range.revision, 12);
        assert_eq!(range.kvs[0].lease, 77);
        assert_eq!(range.kvs[0].key, b"/m/hello/a");
        assert_eq!(range.kvs[0].value, b"{}");
        // No keys: etcd omits `kvs`.
        assert_eq!(parse_range(br#"{"header":{"revision":"3"}}"#).unwrap().kvs, []);
    }

    #[test]
    fn malformed_range_responses_are_errors() {
        let bad_key = br#"{"header":{"revision":"1"},"kvs":[{"key":"!!!","value":"e30="}]}"#;
        assert!(parse_range(bad_key).unwrap_err().contains("base64"));
        let bad_value = br#"{"header":{"revision":"1"},"kvs":[{"key":"YQ==","value":"%%"}]}"#;
        assert!(parse_range(bad_value).unwrap_err().contains("the value of 'a'"));
        assert!(parse_range(b"<html>").is_err());
        assert!(parse_range(br#"{"kvs":[]}"#).unwrap_err().contains("header"));
        assert!(parse_range(br#"{"header":{"revision":"x"}}"#).is_err());
    }

    #[test]
    fn watch_lines() {
        let created = br#"{"result":{"header":{"revision":"7"},"created":true}}"#;
        assert_eq!(parse_watch_line(created).unwrap(), WatchMessage::Created);
        let put =
            br#"{"result":{"header":{"revision":"8"},"events":[{"kv":{"key":"YQ==","value":"YQ=="}}]}}"#;
        assert_eq!(parse_watch_line(put).unwrap(), WatchMessage::Events(1));
        let compacted = br#"{"result":{"header":{},"canceled":true,"compact_revision":"9"}}"#;
        assert_eq!(parse_watch_line(compacted).unwrap(), WatchMessage::Compacted(9));
        let error = br#"{"error":{"grpc_code":14,"http_code":503,"message":"unavailable"}}"#;
        assert_eq!(
            parse_watch_line(error).unwrap(),
            WatchMessage::Error("unavailable".into())
        );
        assert!(parse_watch_line(b"{").is_err());
    }

    #[test]
    fn leases() {
        assert_eq!(
            parse_lease_grant(br#"{"header":{},"ID":"7587","TTL":"15"}"#).unwrap(),
            "7587"
        );
        assert!(parse_lease_grant(br#"{"header":{}}"#).is_err());
        assert!(parse_keep_alive(br#"{"result":{"header":{},"ID":"7587","TTL":"15"}}"#).unwrap());
        // An unknown lease: 200, no TTL.
        assert!(!parse_keep_alive(br#"{"result":{"header":{},"ID":"7587"}}"#).unwrap());
    }

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"/m/hello/"), b"/m/hello0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), [0]);
    }

    #[test]
    fn error_messages() {
        assert_eq!(
            error_message(br#"{"error":"etcdserver: invalid auth token","code":16,"message":"etcdserver: invalid auth token"}"#),
            "etcdserver: invalid auth token"
        );
        assert_eq!(error_message(b"plain text"), "plain text");
        assert_eq!(error_message(&[b'x'; 400]).len(), 303);
    }
}
