//! `tower::discover` over a watched query (feature `tower`): the endpoints of a query as
//! a stream of [`Change::Insert`] / [`Change::Remove`], for tower's balancers and for
//! `tonic::transport::Channel::balance_channel`.

use std::collections::{HashSet, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_core::Stream;
use tower::discover::Change;

use wasd_core::{Endpoint, EndpointSet, Error, Watch};

use crate::resolver::Resolver;

type NextSet = Pin<Box<dyn Future<Output = (Watch, Option<EndpointSet>)> + Send>>;

/// The endpoints of one query as `tower::discover` changes, keyed by [`Endpoint`], each
/// endpoint made into a service by the function given to [`Resolver::discover`].
///
/// The current endpoints come first, as inserts; then each change of the query's set as
/// removes and inserts. Like Kratos's resolver it never empties: a set with no endpoint
/// (a registry briefly empty, every instance deregistered) is skipped with a warning,
/// and the services stay until endpoints come back. The stream ends when the resolver is
/// dropped.
pub struct Discover<S, F> {
    make: F,
    current: HashSet<Endpoint>,
    pending: VecDeque<Change<Endpoint, S>>,
    state: State,
}

enum State {
    Idle(Watch),
    Waiting(NextSet),
    Done,
}

// No field is ever pinned: the future is boxed.
impl<S, F> Unpin for Discover<S, F> {}

impl<S, F: FnMut(&Endpoint) -> S> Discover<S, F> {
    fn apply(&mut self, set: &EndpointSet) {
        if set.is_empty() {
            tracing::warn!(
                "the watched query has no endpoints now; keeping the {} services it had",
                self.current.len()
            );
            return;
        }
        let new: HashSet<&Endpoint> = set.iter().collect();
        let gone: Vec<Endpoint> = self
            .current
            .iter()
            .filter(|e| !new.contains(e))
            .cloned()
            .collect();
        for endpoint in gone {
            self.current.remove(&endpoint);
            self.pending.push_back(Change::Remove(endpoint));
        }
        for endpoint in set.iter() {
            if self.current.insert(endpoint.clone()) {
                let service = (self.make)(endpoint);
                self.pending.push_back(Change::Insert(endpoint.clone(), service));
            }
        }
    }
}

impl<S, F: FnMut(&Endpoint) -> S> Stream for Discover<S, F> {
    type Item = Result<Change<Endpoint, S>, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(change) = this.pending.pop_front() {
                return Poll::Ready(Some(Ok(change)));
            }
            match std::mem::replace(&mut this.state, State::Done) {
                State::Idle(mut watch) => {
                    this.state = State::Waiting(Box::pin(async move {
                        let set = watch.changed().await;
                        (watch, set)
                    }));
                }
                State::Waiting(mut next) => match next.as_mut().poll(cx) {
                    Poll::Pending => {
                        this.state = State::Waiting(next);
                        return Poll::Pending;
                    }
                    Poll::Ready((_, None)) => return Poll::Ready(None),
                    Poll::Ready((watch, Some(set))) => {
                        this.apply(&set);
                        this.state = State::Idle(watch);
                    }
                },
                State::Done => return Poll::Ready(None),
            }
        }
    }
}

impl Resolver {
    /// Follow `query` as a `tower::discover` stream, making each endpoint into a service
    /// with `make` (a `tonic::transport::Endpoint`, an HTTP client for that address...).
    /// Fails as [`Resolver::resolve`] does when nothing answers now.
    pub async fn discover<S, F>(&self, query: &str, make: F) -> Result<Discover<S, F>, Error>
    where
        F: FnMut(&Endpoint) -> S,
    {
        let watch = self.watch(query).await?;
        let first = watch.current();
        let mut discover = Discover {
            make,
            current: HashSet::new(),
            pending: VecDeque::new(),
            state: State::Idle(watch),
        };
        discover.apply(&first);
        Ok(discover)
    }
}
