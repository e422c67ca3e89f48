//! `wasi:http/outgoing-handler`: HTTP requests sent by the host for a provider, only to
//! the origins its `grants.http` lists, over TLS with the provider's own trust roots.
//!
//! The wasi:http types themselves come from `wasmtime-wasi-http`; this file supplies
//! the hooks that decide whether and how a request goes out. The sending half follows
//! `wasmtime_wasi_http::default_send_request`, which hard-codes the web PKI roots: a
//! registry inside a company network is usually signed by a private CA.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::body::{Body, Bytes, Frame, Incoming};
use hyper::client::conn::http1::SendRequest;
use rustls::pki_types::ServerName;
use rustls::pki_types::pem::PemObject;
use tokio::net::TcpStream;
use wasmtime_wasi_http::io::TokioIo;
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
/// How long a pooled connection may take to be ready before a new one is opened.
const POOLED_READY_TIMEOUT: Duration = Duration::from_millis(100);
/// Requests with a body up to this size are buffered when they go out on a pooled
/// connection, so they can be sent again on a new one if the server closed the pooled
/// one as the request went out (the keep-alive race).
const MAX_REPLAY_BODY: u64 = 64 << 10;

/// One granted origin, with the scheme's default port made explicit so that
/// `http://etcd` and `http://etcd:80` are the same grant.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Origin {
    https: bool,
    host: String,
    port: u16,
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

    fn server_name(&self) -> Result<ServerName<'static>, String> {
        let host = self.host.trim_start_matches('[').trim_end_matches(']');
        ServerName::try_from(host.to_owned()).map_err(|e| format!("'{host}' is not a TLS server name: {e}"))
    }
}

/// What a provider's outgoing HTTP may do. Built once per provider, shared by its
/// instances.
pub(crate) struct HttpPolicy {
    provider: Arc<str>,
    origins: Vec<Origin>,
    tls: Arc<rustls::ClientConfig>,
    pool: Arc<Pool>,
}

/// Keep-alive connections shared by a provider's instances, per origin. A registry is
/// asked again on every refresh and lease keep-alive; a new TCP (and TLS) connection
/// each time costs more than the request itself.
#[derive(Default)]
struct Pool {
    idle: Mutex<HashMap<Origin, Vec<IdleConnection>>>,
    /// Whether a sweeper task is closing this pool's expired connections.
    sweeping: AtomicBool,
}

/// A connection's sending half, and since when it has been idle.
type IdleConnection = (SendRequest<WasiBody>, Instant);

/// Still open, and idle for less than the idle timeout.
fn usable((sender, since): &IdleConnection) -> bool {
    !sender.is_closed() && since.elapsed() < IDLE_TIMEOUT
}

impl Pool {
    /// The most recently used idle connection to `origin` that is still open.
    fn take(&self, origin: &Origin) -> Option<SendRequest<WasiBody>> {
        let mut idle = self.idle.lock().expect("pool lock");
        let list = idle.get_mut(origin)?;
        while let Some(idle) = list.pop() {
            if usable(&idle) {
                return Some(idle.0);
            }
        }
        None
    }

    fn put(self: &Arc<Self>, origin: Origin, sender: SendRequest<WasiBody>) {
        if sender.is_closed() {
            return;
        }
        {
            let mut idle = self.idle.lock().expect("pool lock");
            let list = idle.entry(origin).or_default();
            list.retain(usable);
            if list.len() >= MAX_IDLE_PER_ORIGIN {
                return;
            }
            list.push((sender, Instant::now()));
        }
        // One task per pool, while it has idle connections, closes them when their idle
        // time is up (not one timer per request).
        if !self.sweeping.swap(true, Ordering::AcqRel) {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn(sweep(Arc::downgrade(self)))),
                Err(_) => self.sweeping.store(false, Ordering::Release),
            }
        }
    }
}

/// How often a pool's expired idle connections are looked for: they close at most this
/// long after their idle time is up.
const SWEEP_PERIOD: Duration = Duration::from_secs(5);

/// Drop a pool's expired idle connections every [`SWEEP_PERIOD`]; end when none is left
/// (the next `put` starts another) or the pool is gone.
async fn sweep(pool: Weak<Pool>) {
    loop {
        tokio::time::sleep(SWEEP_PERIOD).await;
        let Some(pool) = pool.upgrade() else { return };
        let mut idle = pool.idle.lock().expect("pool lock");
        idle.retain(|_, list| {
            list.retain(usable);
            !list.is_empty()
        });
        if idle.is_empty() {
            // Under the lock: a `put` after this sees the flag down and starts a sweeper.
            pool.sweeping.store(false, Ordering::Release);
            return;
        }
    }
}

/// TLS material for a provider's HTTPS, as read from the files in its config.
#[derive(Default)]
pub(crate) struct TlsFiles {
    /// PEM CA certificates, trusted instead of the web PKI roots.
    pub ca: Option<Vec<u8>>,
    /// PEM client certificate chain and private key, for mutual TLS.
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

impl HttpPolicy {
    pub fn new(provider: Arc<str>, granted: &[String], tls: TlsFiles) -> Result<HttpPolicy, String> {
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
        Ok(HttpPolicy {
            provider,
            origins,
            tls: Arc::new(config),
            pool: Arc::default(),
        })
    }
}

/// The per-instance hooks: the policy, and how many requests the instance has sent.
pub(crate) struct HttpHooks {
    policy: Arc<HttpPolicy>,
    pub requests: u32,
}

impl HttpHooks {
    pub fn new(policy: Arc<HttpPolicy>) -> HttpHooks {
        HttpHooks { policy, requests: 0 }
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
        Box::new(async move {
            let origin = Origin::of(request.uri()).ok_or(HttpError::HttpRequestUriInvalid)?;
            if !policy.origins.contains(&origin) {
                tracing::warn!(
                    provider = %policy.provider,
                    origin = %format_args!("{}://{}", if origin.https { "https" } else { "http" }, origin.address()),
                    "HTTP request denied: the origin is not in the provider's grants.http"
                );
                return Err(HttpError::HttpRequestDenied);
            }
            let response = send(request, options, origin, &policy).await?;
            // The connection runs on its own task (it outlives the response when pooled).
            let io = async { Ok(()) };
            Ok((response.map(BodyExt::boxed_unsync), Box::new(io) as IoFuture))
        })
    }
}

trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Sync + Unpin + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Sync + Unpin + 'static> Stream for T {}

async fn send(
    mut request: http::Request<WasiBody>,
    options: Option<RequestOptions>,
    origin: Origin,
    policy: &HttpPolicy,
) -> Result<http::Response<PooledBody>, HttpError> {
    let options = options.unwrap_or_default();
    let connect_timeout = options.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    let first_byte_timeout = options.first_byte_timeout.unwrap_or(DEFAULT_FIRST_BYTE_TIMEOUT);
    let between_bytes = options
        .between_bytes_timeout
        .unwrap_or(DEFAULT_BETWEEN_BYTES_TIMEOUT)
        .max(Duration::from_millis(1));

    // Origin-form on the wire: scheme and authority only go to proxies.
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    *request.uri_mut() = http::Uri::builder()
        .path_and_query(path)
        .build()
        .map_err(|_| HttpError::HttpRequestUriInvalid)?;

    let respond = |response: http::Response<Incoming>, sender| {
        response.map(|incoming| PooledBody {
            body: TimedBody::new(incoming, between_bytes),
            reuse: Some((policy.pool.clone(), origin.clone(), sender)),
            done: false,
        })
    };
    // A pooled connection first. If it fails before any answer, the request goes out
    // again on a new connection: handed back unsent by hyper, or rebuilt from its
    // buffered body.
    if let Some(mut sender) = policy.pool.take(&origin)
        && let Ok(Ok(())) = tokio::time::timeout(POOLED_READY_TIMEOUT, sender.ready()).await
    {
        let (attempt, replay) = if replayable(&request) {
            let buffered = buffer(request, first_byte_timeout).await?;
            (buffered.request(), Some(buffered))
        } else {
            (request, None)
        };
        match tokio::time::timeout(first_byte_timeout, sender.try_send_request(attempt)).await {
            Err(_) => return Err(HttpError::ConnectionReadTimeout),
            Ok(Ok(response)) => return Ok(respond(response, sender)),
            Ok(Err(mut e)) => match (e.take_message(), &replay) {
                (Some(unsent), _) => request = unsent,
                (None, Some(buffered)) => {
                    tracing::debug!("a pooled connection failed ({}); sending again", e.error());
                    request = buffered.request();
                }
                (None, None) => return Err(e.into_error().into()),
            },
        }
    }
    let mut sender = connect(&origin, policy.tls.clone(), connect_timeout).await?;
    let response = tokio::time::timeout(first_byte_timeout, sender.send_request(request))
        .await
        .map_err(|_| HttpError::ConnectionReadTimeout)??;
    Ok(respond(response, sender))
}

/// A request with no body or a declared one small enough to buffer.
fn replayable(request: &http::Request<WasiBody>) -> bool {
    let declared = request
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    request.body().is_end_stream() || declared.is_some_and(|n| n <= MAX_REPLAY_BODY)
}

/// A request whose body has been read, to send more than once.
struct Buffered {
    method: http::Method,
    uri: http::Uri,
    version: http::Version,
    headers: http::HeaderMap,
    body: Bytes,
}

impl Buffered {
    fn request(&self) -> http::Request<WasiBody> {
        let mut request = http::Request::new(
            http_body_util::Full::new(self.body.clone())
                .map_err(|never| match never {})
                .boxed_unsync(),
        );
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.version_mut() = self.version;
        *request.headers_mut() = self.headers.clone();
        request
    }
}

/// Read the whole body (the guest writes it before it waits for the answer).
async fn buffer(request: http::Request<WasiBody>, timeout: Duration) -> Result<Buffered, HttpError> {
    let (parts, body) = request.into_parts();
    let body = tokio::time::timeout(timeout, body.collect())
        .await
        .map_err(|_| HttpError::ConnectionReadTimeout)??
        .to_bytes();
    Ok(Buffered {
        method: parts.method,
        uri: parts.uri,
        version: parts.version,
        headers: parts.headers,
        body,
    })
}

/// A new HTTP/1.1 connection (TLS for https), driven by its own task until it closes.
async fn connect(
    origin: &Origin,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
) -> Result<SendRequest<WasiBody>, HttpError> {
    let tcp = tokio::time::timeout(timeout, TcpStream::connect(origin.address()))
        .await
        .map_err(|_| HttpError::ConnectionTimeout)?
        .map_err(HttpError::Connect)?;
    let _ = tcp.set_nodelay(true);
    let stream: Box<dyn Stream> = if origin.https {
        let name = origin.server_name().map_err(|e| {
            tracing::debug!("{e}");
            HttpError::HttpRequestUriInvalid
        })?;
        let connector = tokio_rustls::TlsConnector::from(tls);
        let tls = tokio::time::timeout(timeout, connector.connect(name, tcp))
            .await
            .map_err(|_| HttpError::ConnectionTimeout)?
            .map_err(HttpError::Tls)?;
        Box::new(tls)
    } else {
        Box::new(tcp)
    };
    let (sender, conn) = tokio::time::timeout(
        timeout,
        hyper::client::conn::http1::Builder::new().handshake(TokioIo::new(stream)),
    )
    .await
    .map_err(|_| HttpError::ConnectionTimeout)??;
    // Ends when the server closes, or when the sender is dropped and the connection is
    // idle (a body dropped half-read also closes it).
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("HTTP connection ended: {e}");
        }
    });
    Ok(sender)
}

/// A response body that hands its connection back to the pool once read to the end.
struct PooledBody {
    body: TimedBody,
    reuse: Option<(Arc<Pool>, Origin, SendRequest<WasiBody>)>,
    done: bool,
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, HttpError>>> {
        let polled = std::pin::Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(None) => self.done = true,
            std::task::Poll::Ready(Some(Err(_))) => self.reuse = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        if (self.done || self.body.is_end_stream())
            && let Some((pool, origin, sender)) = self.reuse.take()
        {
            pool.put(origin, sender);
        }
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
}
