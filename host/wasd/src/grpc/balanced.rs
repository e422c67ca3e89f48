//! A gRPC channel balanced by wasd itself: each call picks its endpoint through the
//! query's [`Balancer`] (the configured strategy, zone, subset, checks and ejection) and
//! goes over that endpoint's own tonic channel, so the call's outcome is known to be
//! that endpoint's and counts in the resolver's health table. tonic's balanced channel
//! ([`ChannelBuilder::build`](super::ChannelBuilder::build)) picks inside and cannot say
//! where a call went.
//!
//! What counts against an endpoint, as in the HTTP client: a connection that cannot be
//! made, a call that breaks (reset, timeout), and the statuses that say the endpoint
//! could not serve, UNAVAILABLE and DEADLINE_EXCEEDED (HTTP's 503 and 504; a proxy's
//! 502–504 too). Any other status is the application's answer.

use std::collections::HashMap;
use std::fmt;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::OnceCell;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::Service;
use tonic::transport::Channel;

use wasd_core::{Endpoint, Query};

use super::{Configure, tonic_endpoint};
use crate::balance::{Balancer, PickKey, Picked, error_chain};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A tonic channel whose calls wasd balances (from
/// [`ChannelBuilder::build_balanced`](super::ChannelBuilder::build_balanced) or
/// [`Resolver::grpc_balanced_channel`](crate::Resolver::grpc_balanced_channel)): give it
/// to a generated client as a [`Channel`] would be. Cheap to clone; clones share the
/// balancer and the connections.
///
/// A call whose request carries a [`PickKey`] extension is routed by it under
/// consistent hashing (`request.extensions_mut().insert(PickKey::new(user_id))`).
#[derive(Clone)]
pub struct BalancedChannel {
    inner: Arc<Inner>,
}

struct Inner {
    balancer: Balancer,
    query: Query,
    configure: Option<Configure>,
    /// Endpoints a call may try before it fails: only those whose connection could not
    /// be made are passed over (the request is still unsent then).
    attempts: usize,
    /// One tonic channel per endpoint, connected by the first call that picks it (and
    /// tried again by the next one if that failed).
    channels: Mutex<HashMap<Endpoint, Arc<OnceCell<Channel>>>>,
    /// The balancer's set version `channels` was last pruned at.
    pruned_at: AtomicU64,
}

impl BalancedChannel {
    pub(super) fn new(
        balancer: Balancer,
        query: Query,
        configure: Option<Configure>,
        attempts: usize,
    ) -> BalancedChannel {
        let pruned_at = AtomicU64::new(balancer.set_version());
        BalancedChannel {
            inner: Arc::new(Inner {
                balancer,
                query,
                configure,
                attempts: attempts.max(1),
                channels: Mutex::default(),
                pruned_at,
            }),
        }
    }

    /// The balancer the calls pick through: its endpoints and their health.
    pub fn balancer(&self) -> &Balancer {
        &self.inner.balancer
    }
}

impl fmt::Debug for BalancedChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BalancedChannel")
            .field("query", &self.inner.query.as_str())
            .field("balancer", &self.inner.balancer)
            .finish()
    }
}

impl Service<http::Request<Body>> for BalancedChannel {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<http::Response<Body>, BoxError>> + Send>>;

    /// Always ready: each call waits for its own endpoint's channel.
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let inner = self.inner.clone();
        Box::pin(async move { inner.call(request).await })
    }
}

impl Inner {
    async fn call(&self, request: http::Request<Body>) -> Result<http::Response<Body>, BoxError> {
        let key = request.extensions().get::<PickKey>().copied();
        let mut last = None;
        for _ in 0..self.attempts {
            let picked = match key {
                Some(key) => self.balancer.pick_hashed(key),
                None => self.balancer.pick(),
            };
            let mut channel = match self.channel(picked.endpoint()).await {
                Ok(channel) => channel,
                Err(e) => {
                    // Not sent: count it against the endpoint and try another.
                    picked.failed();
                    tracing::debug!(endpoint = %picked.endpoint(), query = %self.query, error = %e, "gRPC connect failed");
                    last = Some((picked.endpoint().clone(), e));
                    continue;
                }
            };
            let sent = async {
                poll_fn(|cx| channel.poll_ready(cx)).await?;
                channel.call(request).await
            };
            return match sent.await {
                Ok(response) => Ok(attribute(response, picked)),
                Err(e) => {
                    // Sent (or its connection lost): the caller sees the error.
                    picked.failed();
                    Err(e.into())
                }
            };
        }
        let (endpoint, error) = last.expect("at least one attempt");
        Err(Box::new(Status::unavailable(format!(
            "no endpoint of {} accepted a connection in {} attempts; the last, {endpoint}: {}",
            self.query,
            self.attempts,
            error_chain(&*error)
        ))))
    }

    /// The endpoint's channel, connected.
    async fn channel(&self, endpoint: &Endpoint) -> Result<Channel, BoxError> {
        let cell = {
            let mut channels = self.channels.lock().expect("channels lock");
            let version = self.balancer.set_version();
            if self.pruned_at.swap(version, Ordering::Relaxed) != version {
                // The set changed: close the connections of endpoints that left it.
                let kept: std::collections::HashSet<Endpoint> =
                    self.balancer.endpoints().into_iter().collect();
                channels.retain(|e, _| kept.contains(e));
            }
            // Cloned as a key only the first time: this runs on every call.
            match channels.get(endpoint) {
                Some(cell) => cell.clone(),
                None => channels.entry(endpoint.clone()).or_default().clone(),
            }
        };
        let channel = cell
            .get_or_try_init(|| async {
                let mut tonic = tonic_endpoint(endpoint, &self.query)?;
                if let Some(configure) = &self.configure {
                    tonic = configure(endpoint, tonic);
                }
                tonic.connect().await.map_err(BoxError::from)
            })
            .await?;
        Ok(channel.clone())
    }
}

/// Decide the call's outcome from its response headers, or (for a response that goes
/// on) from its trailers, which the returned body watches for.
fn attribute(response: http::Response<Body>, picked: Picked) -> http::Response<Body> {
    let status = response.status();
    if matches!(status.as_u16(), 502..=504) {
        picked.failed();
        return response;
    }
    // A status in the headers: a trailers-only answer, the whole call.
    if let Some(code) = response.headers().get(GRPC_STATUS) {
        if endpoint_failed(code.as_bytes()) {
            picked.failed();
        } else {
            picked.succeeded();
        }
        return response;
    }
    // The endpoint answered: its latency is the time to the answer's headers, as the
    // HTTP client measures. A failing status in the trailers still counts against it.
    picked.succeeded();
    response.map(|body| {
        Body::new(Watched {
            body,
            picked,
            decided: false,
        })
    })
}

const GRPC_STATUS: &str = "grpc-status";

/// Whether a `grpc-status` says the endpoint could not serve: UNAVAILABLE (14) or
/// DEADLINE_EXCEEDED (4).
fn endpoint_failed(code: &[u8]) -> bool {
    matches!(code, b"14" | b"4")
}

/// Where a watched body reports a failure: the pick (or a test's counter).
trait Outcome {
    fn failed(&self);
}

impl Outcome for Picked {
    fn failed(&self) {
        Picked::failed(self);
    }
}

/// A response body that reports a failing status in its trailers, or its breaking,
/// against the endpoint (once), and holds the pick (an outstanding request) until it is
/// dropped.
struct Watched<P> {
    body: Body,
    picked: P,
    decided: bool,
}

impl<P: Outcome> Watched<P> {
    fn decide(&mut self, failed: bool) {
        if !std::mem::replace(&mut self.decided, true) && failed {
            self.picked.failed();
        }
    }
}

impl<P: Outcome + Unpin> HttpBody for Watched<P> {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    let failed = trailers
                        .get(GRPC_STATUS)
                        .is_some_and(|code| endpoint_failed(code.as_bytes()));
                    self.decide(failed);
                }
            }
            // The stream broke (reset, connection lost): the endpoint's failure.
            Poll::Ready(Some(Err(_))) => self.decide(true),
            Poll::Ready(None) | Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::collections::VecDeque;

    use http_body_util::BodyExt;

    use super::*;

    #[test]
    fn only_unavailable_and_deadline_exceeded_count_against_the_endpoint() {
        for code in 0..=16 {
            let text = code.to_string();
            assert_eq!(
                endpoint_failed(text.as_bytes()),
                code == 14 || code == 4,
                "grpc-status {code}"
            );
        }
    }

    struct Count(Cell<usize>);

    impl Outcome for &Count {
        fn failed(&self) {
            self.0.set(self.0.get() + 1);
        }
    }

    /// A body of one message, then trailers with each of `codes` (`None`: the stream
    /// breaks there).
    fn body(codes: &[Option<&'static str>]) -> Body {
        let mut frames: Vec<Result<Frame<Bytes>, Status>> = vec![Ok(Frame::data(Bytes::from_static(b"msg")))];
        for code in codes {
            frames.push(match code {
                Some(code) => {
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert(GRPC_STATUS, http::HeaderValue::from_static(code));
                    Ok(Frame::trailers(trailers))
                }
                None => Err(Status::internal("stream reset")),
            });
        }
        Body::new(Frames(frames.into()))
    }

    /// A body that yields these frames.
    struct Frames(VecDeque<Result<Frame<Bytes>, Status>>);

    impl HttpBody for Frames {
        type Data = Bytes;
        type Error = Status;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
            Poll::Ready(self.0.pop_front())
        }
    }

    /// Failures reported while a watched `body` is read to its end.
    async fn failures(body: Body) -> usize {
        let count = Count(Cell::new(0));
        let mut watched = Watched {
            body,
            picked: &count,
            decided: false,
        };
        // Read past an error too: a body that broke is not read again, but one frame
        // after another must not count twice.
        while let Some(_frame) = watched.frame().await {}
        count.0.get()
    }

    #[tokio::test]
    async fn a_failing_status_in_the_trailers_or_a_broken_stream_counts_once() {
        assert_eq!(failures(body(&[Some("14")])).await, 1);
        assert_eq!(failures(body(&[Some("4")])).await, 1);
        assert_eq!(failures(body(&[Some("0")])).await, 0);
        assert_eq!(failures(body(&[Some("13")])).await, 0);
        assert_eq!(failures(body(&[None])).await, 1);
        // Decided once: by the first trailers or breaking.
        assert_eq!(failures(body(&[Some("14"), None])).await, 1);
        assert_eq!(failures(body(&[Some("0"), None])).await, 0);
    }
}
