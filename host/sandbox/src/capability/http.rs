//! HTTP, one home for the capability: the grant (`grants.http` origins, parsed here
//! and nowhere else), TLS with the provider's own trust roots, and the
//! `wasi:http/outgoing-handler` hooks that send a request only to a granted origin.
//!
//! The wasi:http types themselves come from `wasmtime-wasi-http`; this file supplies
//! the hooks that decide whether and how a request goes out. Sending is hyper-util's
//! pooled client with hyper-rustls over the provider's own `rustls` configuration,
//! instead of `wasmtime_wasi_http::default_send_request`, which connects anew for every
//! request and hard-codes the web PKI roots (a registry inside a company network is
//! usually signed by a private CA).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::body::{Body, Bytes, Frame, Incoming};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::pem::PemObject;
use tracing::Instrument;
use wasd_core::{Import, ImportKind, Imports};
use wasmtime_wasi_http::{
    Error as HttpError, RequestOptions, WasiBody, WasiHttpCtxView, WasiHttpHooks, WasiHttpView,
};

use crate::provider::ProviderState;

/// Used when the guest sets no timeout of its own.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_BETWEEN_BYTES_TIMEOUT: Duration = Duration::from_secs(600);
/// Idle keep-alive connections kept per origin, and for how long.
const MAX_IDLE_PER_ORIGIN: usize = 8;
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// How a provider's client keeps connections: [`POOL`], or shorter in tests.
#[derive(Debug, Clone, Copy)]
struct Pool {
    idle_timeout: Duration,
    max_idle_per_origin: usize,
}

const POOL: Pool = Pool {
    idle_timeout: IDLE_TIMEOUT,
    max_idle_per_origin: MAX_IDLE_PER_ORIGIN,
};

/// One granted origin, with the scheme's default port made explicit so that
/// `http://etcd` and `http://etcd:80` are the same grant.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Origin {
    https: bool,
    host: String,
    port: u16,
}

/// A granted origin as the config writes it, normalised: lower-case
/// `scheme://host[:port]`, only http and https, no path, query or user info.
pub fn normalize_origin(origin: &str) -> Result<String, String> {
    let not_origin = || format!("'{origin}' is not an origin like \"http://127.0.0.1:2379\"");
    let uri: http::Uri = origin.parse().map_err(|_| not_origin())?;
    let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
        return Err(not_origin());
    };
    let scheme = scheme.to_ascii_lowercase();
    if scheme != "http" && scheme != "https" {
        return Err(format!("'{origin}': only http and https origins can be granted"));
    }
    let path = uri.path_and_query().map_or("", |p| p.as_str());
    if !(path.is_empty() || path == "/") || authority.as_str().contains('@') {
        return Err(format!(
            "'{origin}' is not an origin (scheme://host[:port], no path)"
        ));
    }
    Ok(format!("{scheme}://{}", authority.as_str().to_ascii_lowercase()))
}

/// The origins among `wanted` that `granted` does not cover (default ports made
/// explicit on both sides).
pub(crate) fn ungranted_origins<'a>(granted: &[String], wanted: &'a [String]) -> Vec<&'a str> {
    let granted: Vec<Origin> = granted.iter().filter_map(|o| Origin::parse(o)).collect();
    wanted
        .iter()
        .filter(|w| Origin::parse(w).is_none_or(|origin| !granted.contains(&origin)))
        .map(String::as_str)
        .collect()
}

impl Origin {
    fn parse(text: &str) -> Option<Origin> {
        let uri: http::Uri = text.parse().ok()?;
        Origin::of(&uri)
    }

    fn of(uri: &http::Uri) -> Option<Origin> {
        let https = match uri.scheme_str()? {
            s if s.eq_ignore_ascii_case("https") => true,
            s if s.eq_ignore_ascii_case("http") => false,
            _ => return None,
        };
        let authority = uri.authority()?;
        Some(Origin {
            https,
            host: authority.host().to_ascii_lowercase(),
            port: authority.port_u16().unwrap_or(if https { 443 } else { 80 }),
        })
    }

    /// `host:port` for connecting; IPv6 hosts keep their brackets from the URI.
    fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// What a provider's outgoing HTTP may do. Built once per provider, shared by its
/// instances.
pub(crate) struct HttpPolicy {
    provider: Arc<str>,
    origins: Vec<Origin>,
    /// hyper-util's pooled client over the provider's own TLS roots: keep-alive
    /// connections shared by the provider's instances, per origin. A registry is asked
    /// again on every refresh and lease keep-alive; a new TCP (and TLS) connection each
    /// time would cost more than the request itself.
    client: Client<HttpsConnector<HttpConnector>, WasiBody>,
    /// The same connector without a pool: a request sent again after a kept connection
    /// dropped it goes out on a new connection, not on another kept one that may have
    /// been closed with it.
    fresh: Client<HttpsConnector<HttpConnector>, WasiBody>,
}

/// TLS material for a provider's HTTPS, as read from the files in its config.
#[derive(Default)]
pub(crate) struct TlsFiles {
    /// PEM CA certificates, trusted instead of the web PKI roots.
    pub(crate) ca: Option<Vec<u8>>,
    /// PEM client certificate chain and private key, for mutual TLS.
    pub(crate) client: Option<(Vec<u8>, Vec<u8>)>,
}

impl HttpPolicy {
    pub(crate) fn new(provider: Arc<str>, granted: &[String], tls: TlsFiles) -> Result<HttpPolicy, String> {
        HttpPolicy::with_pool(provider, granted, tls, POOL)
    }

    fn with_pool(
        provider: Arc<str>,
        granted: &[String],
        tls: TlsFiles,
        pool: Pool,
    ) -> Result<HttpPolicy, String> {
        let origins = granted
            .iter()
            .map(|o| Origin::parse(o).ok_or_else(|| format!("'{o}' is not an HTTP origin")))
            .collect::<Result<_, _>>()?;
        let mut roots = rustls::RootCertStore::empty();
        match &tls.ca {
            Some(pem) => {
                let mut count = 0;
                for cert in rustls::pki_types::CertificateDer::pem_slice_iter(pem) {
                    let cert = cert.map_err(|e| format!("the CA file is not PEM: {e}"))?;
                    roots
                        .add(cert)
                        .map_err(|e| format!("the CA file holds an unusable certificate: {e}"))?;
                    count += 1;
                }
                if count == 0 {
                    return Err("the CA file holds no certificate".into());
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let builder =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("TLS setup: {e}"))?
                .with_root_certificates(roots);
        let config = match tls.client {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain = rustls::pki_types::CertificateDer::pem_slice_iter(&cert)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("the client certificate is not PEM: {e}"))?;
                let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(&key)
                    .map_err(|e| format!("the client key is not a PEM private key: {e}"))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("the client certificate and key do not fit: {e}"))?
            }
        };
        let mut http = HttpConnector::new();
        // https origins go through the TLS layer, which needs the plain one to let them by.
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(DEFAULT_CONNECT_TIMEOUT));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let fresh = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .timer(TokioTimer::new())
            .build(connector.clone());
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(pool.idle_timeout)
            .pool_max_idle_per_host(pool.max_idle_per_origin)
            // A pooled connection the server closed just before the request went out
            // (the keep-alive race): send again on a new one. hyper-util's default,
            // stated because the pool relies on it.
            .retry_canceled_requests(true)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        Ok(HttpPolicy {
            provider,
            origins,
            client,
            fresh,
        })
    }
}

/// The per-instance hooks: the policy, and how many requests the instance has sent.
pub(crate) struct HttpHooks {
    policy: Arc<HttpPolicy>,
    pub(crate) requests: u32,
    /// Where the current call notes its requests, when it is being explained.
    pub(crate) journal: Option<Imports>,
}

impl HttpHooks {
    pub(crate) fn new(policy: Arc<HttpPolicy>) -> HttpHooks {
        HttpHooks {
            policy,
            requests: 0,
            journal: None,
        }
    }
}

impl WasiHttpView for ProviderState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.http_hooks,
        }
    }
}

type IoFuture = Box<dyn Future<Output = Result<(), HttpError>> + Send>;

impl WasiHttpHooks for HttpHooks {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _fut: IoFuture,
    ) -> Box<dyn Future<Output = Result<(http::Response<WasiBody>, IoFuture), HttpError>> + Send> {
        // Counted whether or not it is allowed: the handle wasmtime-wasi-http keeps is
        // per request the guest makes.
        self.requests = self.requests.saturating_add(1);
        let policy = self.policy.clone();
        let journal = self.journal.clone();
        // wasmtime-wasi-http sends from a task of its own: it runs in the provider
        // call's span, so the request's span nests (and ends) inside it.
        let call = tracing::Span::current();
        let sent = async move {
            let origin = Origin::of(request.uri()).ok_or(HttpError::HttpRequestUriInvalid)?;
            let named = format!(
                "{}://{}",
                if origin.https { "https" } else { "http" },
                origin.address()
            );
            let started = std::time::Instant::now();
            // The method and path, for an explanation (never the query string: it may
            // carry a token).
            let line = journal
                .is_some()
                .then(|| format!("{} {}", request.method(), request.uri().path()));
            let note = |said: String| {
                if let (Some(journal), Some(line)) = (&journal, &line) {
                    journal.push(Import::new(
                        ImportKind::Http,
                        &named,
                        line,
                        said,
                        started.elapsed(),
                    ));
                }
            };
            if !policy.origins.contains(&origin) {
                note("denied: not in the provider's grants.http".to_owned());
                // The guest gets the denial as its error, which names the origin; the
                // caller sees it in the provider's failure, once.
                tracing::debug!(
                    provider = %policy.provider,
                    origin = %named,
                    "HTTP request denied: the origin is not in the provider's grants.http"
                );
                return Err(HttpError::HttpRequestDenied);
            }
            let span = tracing::debug_span!("http_request", origin = %named);
            let response = send(request, options, &policy).instrument(span).await;
            note(match &response {
                Ok(response) => response.status().to_string(),
                Err(e) => e.to_string(),
            });
            metrics::histogram!(
                crate::metrics::names::HTTP_REQUEST_DURATION,
                "provider" => policy.provider.to_string(),
                "origin" => named
            )
            .record(started.elapsed().as_secs_f64());
            let response = response?;
            // The connection runs on its own task (it outlives the response when pooled).
            let io = async { Ok(()) };
            Ok((response.map(BodyExt::boxed_unsync), Box::new(io) as IoFuture))
        };
        Box::new(sent.instrument(call))
    }
}

/// Send on the provider's pooled client. hyper-util sends a request again on a new
/// connection when a pooled one turns out closed before the request went out (the
/// keep-alive race), and closes idle connections after [`IDLE_TIMEOUT`]; when it
/// turns out closed only after, an idempotent request with an empty body is sent again
/// here.
async fn send(
    request: http::Request<WasiBody>,
    options: Option<RequestOptions>,
    policy: &HttpPolicy,
) -> Result<http::Response<TimedBody>, HttpError> {
    let options = options.unwrap_or_default();
    // The pooled client connects with the default connect timeout; a guest's own
    // connect and first-byte timeouts bound the whole wait for the response head.
    let connect_timeout = options.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    let first_byte_timeout = options.first_byte_timeout.unwrap_or(DEFAULT_FIRST_BYTE_TIMEOUT);
    let between_bytes = options
        .between_bytes_timeout
        .unwrap_or(DEFAULT_BETWEEN_BYTES_TIMEOUT)
        .max(Duration::from_millis(1));
    let replay = Replay::of(&request);
    let sent = async {
        match policy.client.request(request).await {
            // The keep-alive race past hyper-util's own retry: the request went out on
            // a pooled connection the server had already closed. Sent again, on a new
            // connection (not another kept one), when that is safe (RFC 9110 9.2.2: an
            // idempotent method, and a body known empty), as Go's client does.
            Err(e) if closed_unanswered(&e) => match replay {
                Some(replay) => {
                    tracing::debug!(provider = %policy.provider, "a connection closed before answering; sending the request again");
                    policy.fresh.request(replay.request()).await
                }
                None => Err(e),
            },
            sent => sent,
        }
    };
    let response = tokio::time::timeout(connect_timeout + first_byte_timeout, sent)
        .await
        .map_err(|_| HttpError::ConnectionReadTimeout)?
        .map_err(client_error)?;
    Ok(response.map(|incoming| TimedBody::new(incoming, between_bytes)))
}

/// What it takes to send a request again: its head, when its method is idempotent and
/// its body known empty (no body asked for, or `content-length: 0`).
struct Replay {
    method: http::Method,
    uri: http::Uri,
    version: http::Version,
    headers: http::HeaderMap,
}

impl Replay {
    fn of(request: &http::Request<WasiBody>) -> Option<Replay> {
        use http::Method;
        let idempotent = [
            Method::GET,
            Method::HEAD,
            Method::OPTIONS,
            Method::TRACE,
            Method::PUT,
            Method::DELETE,
        ]
        .contains(request.method());
        let empty = request.body().is_end_stream()
            || request
                .headers()
                .get(http::header::CONTENT_LENGTH)
                .is_some_and(|length| length.as_bytes() == b"0");
        (idempotent && empty).then(|| Replay {
            method: request.method().clone(),
            uri: request.uri().clone(),
            version: request.version(),
            headers: request.headers().clone(),
        })
    }

    fn request(self) -> http::Request<WasiBody> {
        let mut request = http::Request::new(
            http_body_util::Empty::<Bytes>::new()
                .map_err(|never| match never {})
                .boxed_unsync(),
        );
        *request.method_mut() = self.method;
        *request.uri_mut() = self.uri;
        *request.version_mut() = self.version;
        *request.headers_mut() = self.headers;
        request
    }
}

/// Whether the connection ended before any of the answer came: hyper's incomplete
/// message, or a reset or broken pipe, on a connection that was made.
fn closed_unanswered(e: &hyper_util::client::legacy::Error) -> bool {
    use std::error::Error as _;
    if e.is_connect() {
        return false;
    }
    std::iter::successors(e.source(), |&cause| cause.source()).any(|cause| {
        cause
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_incomplete_message)
            || cause.downcast_ref::<std::io::Error>().is_some_and(|io| {
                matches!(
                    io.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                )
            })
    })
}

/// What the guest is told when the client fails: a TLS failure as what it is (a
/// certificate the provider's roots do not trust, or the server's alert: a client
/// certificate it requires, say), which with TLS 1.3 may only show once the request
/// is out; a failed TCP connect with its I/O error; anything else as hyper's or a
/// terminated connection.
fn client_error(e: hyper_util::client::legacy::Error) -> HttpError {
    use std::error::Error as _;
    if let Some(tls) = rustls_cause(&e) {
        return tls_error(tls);
    }
    let mut source = e.source();
    while let Some(cause) = source {
        // Only a failure to connect is a connect error; a reset after the request went
        // out is the connection ending.
        if e.is_connect()
            && let Some(io) = cause.downcast_ref::<std::io::Error>()
        {
            return HttpError::Connect(std::io::Error::new(io.kind(), io.to_string()));
        }
        source = cause.source();
    }
    tracing::debug!("HTTP request failed: {e}");
    if e.is_connect() {
        HttpError::ConnectionRefused
    } else {
        HttpError::ConnectionTerminated
    }
}

/// The rustls error behind a client error, if any: hyper-rustls wraps them in I/O
/// errors, sometimes twice, which hyper wraps again.
fn rustls_cause<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut next = Some(e);
    while let Some(error) = next {
        if let Some(tls) = error.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        next = match error.downcast_ref::<std::io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => error.source(),
        };
    }
    None
}

/// The wasi:http error code for a TLS failure.
fn tls_error(e: &rustls::Error) -> HttpError {
    tracing::debug!("HTTPS failed: {e}");
    match e {
        rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented => {
            HttpError::TlsCertificateError
        }
        rustls::Error::AlertReceived(alert) => HttpError::TlsAlertReceived {
            alert_id: Some(u8::from(*alert)),
            alert_message: Some(format!("{alert:?}")),
        },
        _ => HttpError::TlsProtocolError,
    }
}

/// A response body that fails when the server goes quiet for longer than the
/// between-bytes timeout.
struct TimedBody {
    incoming: Incoming,
    timeout: Duration,
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl TimedBody {
    fn new(incoming: Incoming, timeout: Duration) -> TimedBody {
        TimedBody {
            incoming,
            timeout,
            sleep: Box::pin(tokio::time::sleep(timeout)),
        }
    }
}

impl Body for TimedBody {
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, HttpError>>> {
        use std::task::Poll;
        match std::pin::Pin::new(&mut self.incoming).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let deadline = tokio::time::Instant::now() + self.timeout;
                self.sleep.as_mut().reset(deadline);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(HttpError::from(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match self.sleep.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(HttpError::ConnectionReadTimeout))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.incoming.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn granted_origins_are_normalised_or_refused() {
        assert_eq!(
            normalize_origin("HTTP://127.0.0.1:2379/").unwrap(),
            "http://127.0.0.1:2379"
        );
        assert_eq!(
            normalize_origin("https://Etcd.Internal").unwrap(),
            "https://etcd.internal"
        );
        for (bad, why) in [
            ("127.0.0.1:2379", "is not an origin like"),
            ("ftp://a", "only http and https"),
            ("http://a/path", "no path"),
            ("http://a/?q", "no path"),
            ("http://user@a", "no path"),
        ] {
            let e = normalize_origin(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn origins_compare_with_default_ports() {
        let o = |s: &str| Origin::parse(s).unwrap();
        assert_eq!(o("http://etcd"), o("HTTP://Etcd:80"));
        assert_eq!(o("https://etcd"), o("https://etcd:443"));
        assert_ne!(o("http://etcd:2379"), o("https://etcd:2379"));
        assert_ne!(o("http://etcd:2379"), o("http://etcd:2380"));
        assert_eq!(o("http://[::1]:2379").address(), "[::1]:2379");
        assert!(Origin::parse("ftp://etcd").is_none());
    }

    #[test]
    fn bad_tls_files_are_explained() {
        let policy = |ca: &[u8]| {
            HttpPolicy::new(
                "p".into(),
                &[],
                TlsFiles {
                    ca: Some(ca.to_vec()),
                    client: None,
                },
            )
            .err()
            .unwrap()
        };
        assert!(
            policy(b"not a certificate").contains("no certificate"),
            "{}",
            policy(b"x")
        );
        assert!(policy(b"-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n").contains("CA file"));
    }

    /// Connections a [`KeepAlive`] server has seen.
    #[derive(Debug, Clone, Copy, Default, PartialEq)]
    struct Seen {
        accepted: usize,
        /// Closed by the client (the server read end-of-file).
        closed_by_client: usize,
        requests: usize,
        /// Requests read and left unanswered, their connection closed.
        dropped: usize,
    }

    /// When a [`KeepAlive`] server closes a connection without saying so (no
    /// `connection: close`).
    #[derive(Clone, Copy, PartialEq)]
    enum Close {
        /// Only when the client does.
        Never,
        /// Right after each answer: the keep-alive race, every time.
        AfterAnswer,
        /// On a connection's second request, read and left unanswered: a request that
        /// went out on a kept connection, every time.
        OnSecondRequest,
    }

    /// A keep-alive HTTP/1.1 server on loopback that answers every request after
    /// `hold`, closing connections as `close` says.
    struct KeepAlive {
        url: String,
        seen: tokio::sync::watch::Receiver<Seen>,
    }

    impl KeepAlive {
        async fn start(hold: Duration, close: Close) -> KeepAlive {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            let (tx, seen) = tokio::sync::watch::channel(Seen::default());
            tokio::spawn(async move {
                loop {
                    let (mut stream, _) = listener.accept().await.unwrap();
                    tx.send_modify(|s| s.accepted += 1);
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let mut buffer = Vec::new();
                        let mut chunk = [0u8; 1024];
                        for nth in 1.. {
                            while !buffer.windows(4).any(|w| w == b"\r\n\r\n") {
                                match stream.read(&mut chunk).await {
                                    Ok(0) | Err(_) => {
                                        tx.send_modify(|s| s.closed_by_client += 1);
                                        return;
                                    }
                                    Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                                }
                            }
                            buffer.clear();
                            tx.send_modify(|s| s.requests += 1);
                            if nth == 2 && close == Close::OnSecondRequest {
                                // Counted before the close, which the client sees after.
                                tx.send_modify(|s| s.dropped += 1);
                                return;
                            }
                            tokio::time::sleep(hold).await;
                            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if stream.write_all(answer).await.is_err() || close == Close::AfterAnswer {
                                return;
                            }
                        }
                    });
                }
            });
            KeepAlive { url, seen }
        }

        /// Wait (at most 5 s) until the server has seen what `done` asks for.
        async fn until(&mut self, what: &str, done: impl FnMut(&Seen) -> bool) -> Seen {
            let waited = tokio::time::timeout(Duration::from_secs(5), self.seen.wait_for(done))
                .await
                .map(|seen| *seen.unwrap());
            waited.unwrap_or_else(|_| panic!("{what}: still {:?} after 5 s", *self.seen.borrow()))
        }
    }

    fn policy(server: &KeepAlive, pool: Pool) -> HttpPolicy {
        HttpPolicy::with_pool(
            "p".into(),
            std::slice::from_ref(&server.url),
            TlsFiles::default(),
            pool,
        )
        .unwrap()
    }

    /// One GET through the provider's client, body read to the end.
    async fn get(policy: &HttpPolicy, url: &str) -> Result<Bytes, HttpError> {
        let empty = http_body_util::Empty::<Bytes>::new()
            .map_err(|never| match never {})
            .boxed_unsync();
        let request = http::Request::get(format!("{url}/")).body(empty).unwrap();
        let response = send(request, None, policy).await?;
        Ok(response.into_body().collect().await?.to_bytes())
    }

    /// One POST with a body, as [`get`].
    async fn post(policy: &HttpPolicy, url: &str) -> Result<Bytes, HttpError> {
        let body = http_body_util::Full::new(Bytes::from_static(b"{}"))
            .map_err(|never| match never {})
            .boxed_unsync();
        let request = http::Request::post(format!("{url}/")).body(body).unwrap();
        let response = send(request, None, policy).await?;
        Ok(response.into_body().collect().await?.to_bytes())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_a_kept_connection_drops_is_sent_again_only_when_idempotent() {
        let server = KeepAlive::start(Duration::ZERO, Close::OnSecondRequest).await;
        let policy = policy(&server, POOL);
        let dropped = || server.seen.borrow().dropped;
        // GETs until one goes out on a kept connection (the second or so): the server
        // drops it unanswered, and it is sent again on a new connection.
        for i in 0..50 {
            let before = dropped();
            assert_eq!(
                get(&policy, &server.url)
                    .await
                    .unwrap_or_else(|e| panic!("GET {i}: {e}")),
                "ok"
            );
            if dropped() > before {
                break;
            }
            assert!(i < 49, "no GET went out on a kept connection");
        }
        // A POST is not sent again: the connection's end is its answer.
        for i in 0..50 {
            let before = dropped();
            let answer = post(&policy, &server.url).await;
            if dropped() > before {
                assert!(
                    matches!(answer, Err(HttpError::ConnectionTerminated)),
                    "{answer:?}"
                );
                break;
            }
            assert_eq!(answer.unwrap(), "ok");
            assert!(i < 49, "no POST went out on a kept connection");
        }
    }

    #[test]
    fn the_shipped_pool_keeps_8_connections_per_origin_for_30s() {
        assert_eq!(POOL.max_idle_per_origin, 8);
        assert_eq!(POOL.idle_timeout, Duration::from_secs(30));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn at_most_8_idle_connections_are_kept_per_origin_and_reused() {
        let mut server = KeepAlive::start(Duration::from_millis(200), Close::Never).await;
        let policy = Arc::new(policy(&server, POOL));
        // 20 requests at once need 20 connections; the answers' 200 ms hold keeps
        // them all busy together.
        for body in at_once(&policy, &server.url, 20).await {
            assert_eq!(body.unwrap(), "ok");
        }
        // The client keeps 8 of them and closes the other 12.
        let seen = server
            .until("12 surplus connections closed", |s| s.closed_by_client >= 12)
            .await;
        assert_eq!((seen.accepted, seen.closed_by_client), (20, 12));
        // 8 more at once go over the 8 kept connections: no new connection.
        for body in at_once(&policy, &server.url, 8).await {
            assert_eq!(body.unwrap(), "ok");
        }
        let seen = server.until("8 more requests", |s| s.requests >= 28).await;
        assert_eq!((seen.accepted, seen.closed_by_client), (20, 12), "{seen:?}");
    }

    /// `n` GETs at once.
    async fn at_once(policy: &Arc<HttpPolicy>, url: &str, n: usize) -> Vec<Result<Bytes, HttpError>> {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..n {
            let (policy, url) = (policy.clone(), url.to_owned());
            set.spawn(async move { get(&policy, &url).await });
        }
        set.join_all().await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_connections_are_closed_after_the_idle_timeout() {
        let mut server = KeepAlive::start(Duration::ZERO, Close::Never).await;
        let idle_timeout = Duration::from_millis(300);
        let policy = policy(&server, Pool { idle_timeout, ..POOL });
        assert_eq!(get(&policy, &server.url).await.unwrap(), "ok");
        let answered = std::time::Instant::now();
        server
            .until("the idle connection closed", |s| s.closed_by_client == 1)
            .await;
        // Not before its time: hyper-util's pool sweeps every idle timeout, so it goes
        // between one and two of them.
        assert!(answered.elapsed() >= idle_timeout, "{:?}", answered.elapsed());
        // The client still works, over a new connection.
        assert_eq!(get(&policy, &server.url).await.unwrap(), "ok");
        assert_eq!(
            server
                .until("a new connection", |s| s.requests == 2)
                .await
                .accepted,
            2
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pooled_connection_closed_by_the_server_is_not_an_error() {
        // The server closes every connection right after its answer, without saying
        // so: the client pools it as kept alive, and the next request finds it closed,
        // sometimes only as the request goes out.
        let mut server = KeepAlive::start(Duration::ZERO, Close::AfterAnswer).await;
        let policy = policy(&server, POOL);
        for i in 0..200 {
            let body = get(&policy, &server.url).await;
            assert_eq!(body.unwrap_or_else(|e| panic!("request {i}: {e}")), "ok");
        }
        let seen = server.until("200 requests", |s| s.requests == 200).await;
        assert_eq!(seen.accepted, 200, "one connection per request: {seen:?}");
    }
}
