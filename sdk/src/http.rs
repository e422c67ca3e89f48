//! Outgoing HTTP through the standard `wasi:http` interface, as a small blocking client.
//!
//! The host sends the request only if the provider's config grants its origin
//! (`grants.http`); otherwise [`HttpError::Denied`]. TLS is done by the host, with the
//! trust roots its config gives the provider.
//!
//! ```no_run
//! use std::time::Duration;
//! use wasd_sdk::http::Request;
//!
//! # fn main() -> Result<(), wasd_sdk::http::HttpError> {
//! let response = Request::post("http://127.0.0.1:2379/v3/kv/range")
//!     .header("content-type", "application/json")
//!     .body(br#"{"key":"Zm9v"}"#.to_vec())
//!     .timeout(Duration::from_secs(2))
//!     .send()?;
//! let status = response.status();
//! let body = response.bytes(1 << 20)?;
//! # let _ = (status, body); Ok(()) }
//! ```
//!
//! Streaming bodies (etcd's watch, server-sent lines) are read with
//! [`Response::next_line`], which waits at most a given time.

use std::fmt;
use std::time::{Duration, Instant};

use wasip2::clocks::monotonic_clock;
use wasip2::http::outgoing_handler;
use wasip2::http::types::{
    ErrorCode, Fields, IncomingBody, Method, OutgoingBody, OutgoingRequest, RequestOptions, Scheme,
};
use wasip2::io::streams::{InputStream, StreamError};

/// The most a single `write` to an output stream may carry (wasi:io's guarantee).
const WRITE_CHUNK: usize = 4096;
/// How much is read from a body stream at once.
const READ_CHUNK: u64 = 64 * 1024;

/// What went wrong with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpError {
    /// The host refused the request: its origin is not in this provider's grants.
    Denied(String),
    /// The URL cannot be sent (no `http`/`https` scheme, no host, ...).
    InvalidUrl(String),
    /// No answer, or no more of the body, within the time allowed.
    Timeout,
    /// The connection failed (refused, reset, TLS, DNS...).
    Connection(String),
    /// The response broke the protocol or its body was cut short.
    Protocol(String),
    /// The body is larger than the caller allowed.
    TooLarge(usize),
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::Denied(m) => write!(f, "HTTP request denied by the host: {m}"),
            HttpError::InvalidUrl(m) => write!(f, "invalid URL: {m}"),
            HttpError::Timeout => f.write_str("timed out"),
            HttpError::Connection(m) => write!(f, "connection failed: {m}"),
            HttpError::Protocol(m) => write!(f, "HTTP protocol error: {m}"),
            HttpError::TooLarge(limit) => write!(f, "response body larger than {limit} bytes"),
        }
    }
}

impl std::error::Error for HttpError {}

impl From<HttpError> for crate::Error {
    fn from(e: HttpError) -> Self {
        match e {
            HttpError::Denied(_) => crate::Error::Denied(e.to_string()),
            HttpError::InvalidUrl(_) => crate::Error::InvalidSettings(e.to_string()),
            _ => crate::Error::Unavailable(e.to_string()),
        }
    }
}

fn error_code(code: ErrorCode, what: &str) -> HttpError {
    match code {
        ErrorCode::HttpRequestDenied => {
            HttpError::Denied(format!("{what} is not in this provider's grants.http"))
        }
        ErrorCode::ConnectionReadTimeout | ErrorCode::HttpResponseTimeout | ErrorCode::ConnectionTimeout => {
            HttpError::Timeout
        }
        ErrorCode::HttpRequestUriInvalid => HttpError::InvalidUrl(what.to_owned()),
        ErrorCode::HttpProtocolError | ErrorCode::HttpResponseIncomplete => {
            HttpError::Protocol(format!("{what}: {code:?}"))
        }
        other => HttpError::Connection(format!("{what}: {other:?}")),
    }
}

/// An HTTP request being built.
#[derive(Debug, Clone)]
pub struct Request {
    method: &'static str,
    url: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    connect_timeout: Option<Duration>,
    first_byte_timeout: Option<Duration>,
    between_bytes_timeout: Option<Duration>,
}

impl Request {
    fn new(method: &'static str, url: impl Into<String>) -> Request {
        Request {
            method,
            url: url.into(),
            headers: Vec::new(),
            body: Vec::new(),
            connect_timeout: None,
            first_byte_timeout: None,
            between_bytes_timeout: None,
        }
    }

    /// A `GET` request.
    pub fn get(url: impl Into<String>) -> Request {
        Request::new("GET", url)
    }

    /// A `POST` request.
    pub fn post(url: impl Into<String>) -> Request {
        Request::new("POST", url)
    }

    /// A `PUT` request.
    pub fn put(url: impl Into<String>) -> Request {
        Request::new("PUT", url)
    }

    /// A `DELETE` request.
    pub fn delete(url: impl Into<String>) -> Request {
        Request::new("DELETE", url)
    }

    /// Add a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Request {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Set the body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Request {
        self.body = body.into();
        self
    }

    /// Bound connecting and waiting for the response head by `timeout` each.
    pub fn timeout(mut self, timeout: Duration) -> Request {
        self.connect_timeout = Some(timeout);
        self.first_byte_timeout = Some(timeout);
        self
    }

    /// How long the body may go quiet before reading it fails (streams: long).
    pub fn between_bytes_timeout(mut self, timeout: Duration) -> Request {
        self.between_bytes_timeout = Some(timeout);
        self
    }

    /// Send the request and wait for the response head (status and headers).
    pub fn send(self) -> Result<Response, HttpError> {
        let (scheme, rest) = self
            .url
            .split_once("://")
            .ok_or_else(|| HttpError::InvalidUrl(format!("'{}' has no scheme", self.url)))?;
        let scheme = match scheme.to_ascii_lowercase().as_str() {
            "http" => Scheme::Http,
            "https" => Scheme::Https,
            other => return Err(HttpError::InvalidUrl(format!("'{other}' is not http or https"))),
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(at) => rest.split_at(at),
            None => (rest, "/"),
        };
        if authority.is_empty() {
            return Err(HttpError::InvalidUrl(format!("'{}' has no host", self.url)));
        }
        let path = if path.starts_with('?') {
            format!("/{path}")
        } else {
            path.to_owned()
        };
        let origin = format!(
            "{}://{authority}",
            if matches!(scheme, Scheme::Https) {
                "https"
            } else {
                "http"
            }
        );

        let mut headers = self.headers;
        headers.push(("content-length".into(), self.body.len().to_string().into_bytes()));
        let fields = Fields::from_list(&headers)
            .map_err(|e| HttpError::InvalidUrl(format!("a header is not valid: {e:?}")))?;
        let request = OutgoingRequest::new(fields);
        let method = match self.method {
            "GET" => Method::Get,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "DELETE" => Method::Delete,
            other => Method::Other(other.to_owned()),
        };
        let invalid = |what: &str| HttpError::InvalidUrl(format!("{what} of '{}'", self.url));
        request.set_method(&method).map_err(|()| invalid("the method"))?;
        request
            .set_scheme(Some(&scheme))
            .map_err(|()| invalid("the scheme"))?;
        request
            .set_authority(Some(authority))
            .map_err(|()| invalid("the authority"))?;
        request
            .set_path_with_query(Some(&path))
            .map_err(|()| invalid("the path"))?;
        let body = request
            .body()
            .map_err(|()| HttpError::Protocol("no request body".into()))?;

        let options = RequestOptions::new();
        let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        // A host may not support every timeout; the request still goes out.
        if let Some(t) = self.connect_timeout {
            let _ = options.set_connect_timeout(Some(nanos(t)));
        }
        if let Some(t) = self.first_byte_timeout {
            let _ = options.set_first_byte_timeout(Some(nanos(t)));
        }
        if let Some(t) = self.between_bytes_timeout {
            let _ = options.set_between_bytes_timeout(Some(nanos(t)));
        }
        let pending = outgoing_handler::handle(request, Some(options)).map_err(|e| error_code(e, &origin))?;

        // A server may answer (or the host refuse) before the body is sent: then the
        // response, not the failed write, says what happened.
        let mut write_error = None;
        {
            let stream = body
                .write()
                .map_err(|()| HttpError::Protocol("no request body stream".into()))?;
            for chunk in self.body.chunks(WRITE_CHUNK) {
                if let Err(e) = stream.blocking_write_and_flush(chunk) {
                    write_error = Some(HttpError::Connection(format!(
                        "{origin}: writing the body: {e:?}"
                    )));
                    break;
                }
            }
        }
        let finished = OutgoingBody::finish(body, None);

        pending.subscribe().block();
        let response = match pending.get() {
            Some(Ok(Ok(response))) => response,
            Some(Ok(Err(code))) => return Err(error_code(code, &origin)),
            Some(Err(())) | None => return Err(HttpError::Protocol(format!("{origin}: no response"))),
        };
        if let Some(e) = write_error {
            // Answered early (the server did not read the body): the answer stands
            // only if it is final; a 2xx to a request never fully sent is not.
            if (200..300).contains(&response.status()) {
                return Err(e);
            }
        } else if let Err(e) = finished {
            return Err(error_code(e, &origin));
        }
        let status = response.status();
        let headers = response.headers().entries();
        let body = response
            .consume()
            .map_err(|()| HttpError::Protocol("the response body was already taken".into()))?;
        let stream = body
            .stream()
            .map_err(|()| HttpError::Protocol("the response body stream was already taken".into()))?;
        Ok(Response {
            status,
            headers,
            stream: Some(stream),
            _body: body,
            buffer: Vec::new(),
            done: false,
        })
    }
}

/// A response whose body is still to be read.
pub struct Response {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    // Declared before the body: a stream must be dropped before its body resource.
    stream: Option<InputStream>,
    _body: IncomingBody,
    buffer: Vec<u8>,
    done: bool,
}

impl fmt::Debug for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Response")
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl Response {
    /// The status code.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// The first value of a header, by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// Read the whole body, failing if it is longer than `limit` bytes.
    pub fn bytes(mut self, limit: usize) -> Result<Vec<u8>, HttpError> {
        while !self.done {
            self.fill(None, limit)?;
        }
        Ok(std::mem::take(&mut self.buffer))
    }

    /// The next `\n`-terminated line of a streaming body (without the newline), waiting
    /// at most `wait`. `Ok(None)` at the end of the body; [`HttpError::Timeout`] when
    /// no complete line arrived in time (what arrived is kept for the next call).
    pub fn next_line(&mut self, wait: Duration, limit: usize) -> Result<Option<Vec<u8>>, HttpError> {
        let deadline = Instant::now() + wait;
        let mut searched = 0;
        loop {
            if let Some(at) = self.buffer[searched..].iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buffer.drain(..=searched + at).collect();
                line.pop();
                return Ok(Some(line));
            }
            searched = self.buffer.len();
            if self.done {
                return Ok((!self.buffer.is_empty()).then(|| std::mem::take(&mut self.buffer)));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(HttpError::Timeout);
            }
            self.fill(Some(left), limit)?;
        }
    }

    /// Read what is available (waiting up to `wait`, or for ever) into the buffer.
    fn fill(&mut self, wait: Option<Duration>, limit: usize) -> Result<(), HttpError> {
        let stream = self.stream.as_ref().expect("stream present until done");
        let ready = stream.subscribe();
        match wait {
            None => ready.block(),
            Some(wait) => {
                let timer =
                    monotonic_clock::subscribe_duration(u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX));
                wasip2::io::poll::poll(&[&ready, &timer]);
                if !ready.ready() {
                    return Ok(());
                }
            }
        }
        drop(ready);
        match stream.read(READ_CHUNK) {
            Ok(bytes) => {
                if self.buffer.len() + bytes.len() > limit {
                    return Err(HttpError::TooLarge(limit));
                }
                self.buffer.extend_from_slice(&bytes);
                Ok(())
            }
            Err(StreamError::Closed) => {
                self.done = true;
                self.stream = None;
                Ok(())
            }
            Err(StreamError::LastOperationFailed(e)) => {
                self.done = true;
                self.stream = None;
                Err(HttpError::Connection(format!(
                    "reading the body: {}",
                    e.to_debug_string()
                )))
            }
        }
    }
}
