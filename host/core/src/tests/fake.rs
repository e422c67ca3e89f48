//! Fake sources whose answers, failures and delays a test scripts, and which record
//! when (on tokio's clock) and with what they were called.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::{
    Answer, Cache, Chain, ChainCell, Clock, Endpoint, EndpointSet, Import, ImportKind, Imports,
    ProviderError, ProviderErrorKind, ServiceInstance, Settings, Source, SourceQuery,
};

/// Shorthand for seconds.
pub(super) const fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// Shorthand for milliseconds.
pub(super) const fn ms(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

/// `scheme://host:port` as an endpoint.
pub(super) fn ep(scheme: &str, host: &str) -> Endpoint {
    Endpoint::new(host)
        .with_scheme(scheme)
        .with_port(if scheme == "https" { 443 } else { 80 })
}

/// A bare `host:80`.
pub(super) fn bare(host: &str) -> Endpoint {
    Endpoint::new(host).with_port(80)
}

/// An answer with these endpoints.
pub(super) fn answer(endpoints: &[Endpoint]) -> Answer {
    Answer::new(endpoints.to_vec())
}

/// The set `provider` answered with these endpoints, as the cache publishes it.
pub(super) fn set(provider: &str, endpoints: &[Endpoint]) -> EndpointSet {
    EndpointSet::new(provider.into(), endpoints.to_vec())
}

/// The failure a fake reports: its upstream is down.
pub(super) fn down(provider: &str) -> ProviderError {
    ProviderError::new(provider, ProviderErrorKind::Unavailable("upstream down".into()))
}

/// A cache over `sources`, in this order, on the exact clock.
pub(super) fn cache_of(sources: &[&Arc<Fake>], settings: Settings) -> Cache {
    let chain = Chain::new(sources.iter().map(|s| Arc::clone(s) as Arc<dyn Source>).collect());
    Cache::new(Arc::new(ChainCell::new(chain)), settings, Clock::exact())
}

/// What a fake's `watch` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WatchMode {
    /// Answer `unsupported`, and stop offering watches (as a real source does).
    Unsupported,
    /// Wait for an answer pushed with [`Fake::push`], or the whole `wait`, then say
    /// nothing changed (`Ok(None)`).
    Hold,
    /// Return a changed answer at once, every call (a new version each time).
    Immediate,
    /// Say "nothing changed" at once, whatever the `wait`.
    QuietAtOnce,
}

/// One `watch` call: when, for which version, waiting how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct WatchCall {
    pub(super) at: Duration,
    pub(super) version: String,
    pub(super) wait: Duration,
}

/// A resolver source.
pub(super) struct Fake {
    name: Arc<str>,
    started: Instant,
    reply: Mutex<Result<Answer, ProviderError>>,
    delay: Mutex<Duration>,
    resolves: Mutex<Vec<Duration>>,
    queries: Mutex<Vec<SourceQuery>>,
    can_watch: AtomicBool,
    watch_mode: Mutex<WatchMode>,
    watches: Mutex<Vec<WatchCall>>,
    pushes: tokio::sync::Mutex<mpsc::UnboundedReceiver<Answer>>,
    push: mpsc::UnboundedSender<Answer>,
    versions: AtomicU32,
    fingerprint: Option<[u8; 32]>,
}

impl Fake {
    /// A source named `name` that answers "nothing here" until told otherwise.
    pub(super) fn new(name: &str) -> Fake {
        let (push, pushes) = mpsc::unbounded_channel();
        Fake {
            name: name.into(),
            started: Instant::now(),
            reply: Mutex::new(Ok(Answer::default())),
            delay: Mutex::new(Duration::ZERO),
            resolves: Mutex::new(Vec::new()),
            queries: Mutex::new(Vec::new()),
            can_watch: AtomicBool::new(false),
            watch_mode: Mutex::new(WatchMode::Unsupported),
            watches: Mutex::new(Vec::new()),
            pushes: tokio::sync::Mutex::new(pushes),
            push,
            versions: AtomicU32::new(0),
            fingerprint: None,
        }
    }

    /// Answer with `answer` from the start.
    pub(super) fn answering(self, answer: Answer) -> Fake {
        *self.reply.lock().unwrap() = Ok(answer);
        self
    }

    /// Fail from the start.
    pub(super) fn failing(self) -> Fake {
        let failure = down(&self.name);
        *self.reply.lock().unwrap() = Err(failure);
        self
    }

    /// Take `delay` (on tokio's clock) over each resolve.
    pub(super) fn slow(self, delay: Duration) -> Fake {
        *self.delay.lock().unwrap() = delay;
        self
    }

    /// Offer long-polls that behave as `mode`.
    pub(super) fn watching(self, mode: WatchMode) -> Fake {
        self.can_watch.store(true, Ordering::SeqCst);
        *self.watch_mode.lock().unwrap() = mode;
        self
    }

    /// Made from inputs hashing to `fingerprint`.
    pub(super) fn with_fingerprint(mut self, fingerprint: [u8; 32]) -> Fake {
        self.fingerprint = Some(fingerprint);
        self
    }

    /// Answer with `answer` from now on.
    pub(super) fn answer(&self, answer: Answer) {
        *self.reply.lock().unwrap() = Ok(answer);
    }

    /// Fail from now on.
    pub(super) fn fail(&self) {
        *self.reply.lock().unwrap() = Err(down(&self.name));
    }

    /// Have a held `watch` return `answer` (now, or on its next call).
    pub(super) fn push(&self, answer: Answer) {
        self.push.send(answer).unwrap();
    }

    /// Resolves so far.
    pub(super) fn calls(&self) -> usize {
        self.resolves.lock().unwrap().len()
    }

    /// When each resolve started, since the fake was made.
    pub(super) fn call_times(&self) -> Vec<Duration> {
        self.resolves.lock().unwrap().clone()
    }

    /// When each resolve of `service` started.
    pub(super) fn call_times_for(&self, service: &str) -> Vec<Duration> {
        let times = self.resolves.lock().unwrap().clone();
        let queries = self.queries.lock().unwrap().clone();
        times
            .into_iter()
            .zip(queries)
            .filter(|(_, q)| q.service == service)
            .map(|(t, _)| t)
            .collect()
    }

    /// The queries it was asked.
    pub(super) fn queries(&self) -> Vec<SourceQuery> {
        self.queries.lock().unwrap().clone()
    }

    /// The `watch` calls so far.
    pub(super) fn watch_calls(&self) -> Vec<WatchCall> {
        self.watches.lock().unwrap().clone()
    }
}

#[async_trait]
impl Source for Fake {
    fn name(&self) -> &Arc<str> {
        &self.name
    }

    async fn resolve(&self, query: &SourceQuery) -> Result<Answer, ProviderError> {
        self.resolves.lock().unwrap().push(self.started.elapsed());
        self.queries.lock().unwrap().push(query.clone());
        let delay = *self.delay.lock().unwrap();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        // The reply as of the end of the call, as a real slow upstream would give.
        self.reply.lock().unwrap().clone()
    }

    /// Notes one DNS import, as a DNS provider's call would: the service's name under
    /// the fake's, taking the fake's whole delay.
    async fn resolve_explained(
        &self,
        query: &SourceQuery,
        imports: &Imports,
    ) -> Result<Answer, ProviderError> {
        let result = self.resolve(query).await;
        let said = match &result {
            Ok(answer) => format!("{} records", answer.endpoints.len()),
            Err(failure) => failure.kind.to_string(),
        };
        imports.push(Import::new(
            ImportKind::Dns,
            format!("{}.{}", query.service, self.name),
            "SRV",
            said,
            *self.delay.lock().unwrap(),
        ));
        result
    }

    async fn watch(
        &self,
        _query: &SourceQuery,
        version: &str,
        wait: Duration,
    ) -> Result<Option<Answer>, ProviderError> {
        self.watches.lock().unwrap().push(WatchCall {
            at: self.started.elapsed(),
            version: version.to_owned(),
            wait,
        });
        let mode = *self.watch_mode.lock().unwrap();
        // As an asynchronous source would, let other tasks run before answering.
        tokio::task::yield_now().await;
        match mode {
            WatchMode::Unsupported => {
                self.can_watch.store(false, Ordering::SeqCst);
                Err(self.unsupported("watch"))
            }
            WatchMode::Hold => {
                let mut pushes = self.pushes.lock().await;
                tokio::select! {
                    pushed = pushes.recv() => Ok(pushed),
                    _ = tokio::time::sleep(wait) => Ok(None),
                }
            }
            WatchMode::QuietAtOnce => Ok(None),
            WatchMode::Immediate => {
                let n = self.versions.fetch_add(1, Ordering::SeqCst) + 1;
                let host = format!("10.0.0.{}", n % 250);
                Ok(Some(answer(&[bare(&host)]).with_version(format!("w{n}"))))
            }
        }
    }

    fn can_watch(&self) -> bool {
        self.can_watch.load(Ordering::SeqCst)
    }

    fn fingerprint(&self) -> Option<[u8; 32]> {
        self.fingerprint
    }
}

/// A registrar source: `register` follows a script of results (then succeeds),
/// `keep_alive` a script of answers (then `true`).
pub(super) struct FakeRegistrar {
    name: Arc<str>,
    started: Instant,
    /// Results of the next `register` calls; `Ok(())` grants `lease-N`.
    register_script: Mutex<VecDeque<Result<(), ProviderError>>>,
    registers: Mutex<Vec<(Duration, Duration)>>,
    leases: AtomicU32,
    keep_alive_script: Mutex<VecDeque<bool>>,
    keep_alives: Mutex<Vec<(Duration, String)>>,
    deregisters: Mutex<Vec<(String, Option<String>)>>,
}

impl FakeRegistrar {
    /// A registrar that grants every registration and keeps every lease alive.
    pub(super) fn new(name: &str) -> FakeRegistrar {
        FakeRegistrar {
            name: name.into(),
            started: Instant::now(),
            register_script: Mutex::new(VecDeque::new()),
            registers: Mutex::new(Vec::new()),
            leases: AtomicU32::new(0),
            keep_alive_script: Mutex::new(VecDeque::new()),
            keep_alives: Mutex::new(Vec::new()),
            deregisters: Mutex::new(Vec::new()),
        }
    }

    /// The next `n` registrations fail.
    pub(super) fn fail_registrations(&self, n: usize) {
        let mut script = self.register_script.lock().unwrap();
        script.extend((0..n).map(|_| Err(down(&self.name))));
    }

    /// The next keep-alives answer these (then `true`).
    pub(super) fn keep_alive_answers(&self, answers: &[bool]) {
        self.keep_alive_script.lock().unwrap().extend(answers);
    }

    /// When each `register` started, and the TTL it asked for.
    pub(super) fn registers(&self) -> Vec<(Duration, Duration)> {
        self.registers.lock().unwrap().clone()
    }

    /// When each `keep_alive` started, and for which lease.
    pub(super) fn keep_alives(&self) -> Vec<(Duration, String)> {
        self.keep_alives.lock().unwrap().clone()
    }

    /// Each `deregister`: the instance id and the lease.
    pub(super) fn deregisters(&self) -> Vec<(String, Option<String>)> {
        self.deregisters.lock().unwrap().clone()
    }
}

#[async_trait]
impl Source for FakeRegistrar {
    fn name(&self) -> &Arc<str> {
        &self.name
    }

    async fn resolve(&self, _query: &SourceQuery) -> Result<Answer, ProviderError> {
        Ok(Answer::default())
    }

    fn is_registrar(&self) -> bool {
        true
    }

    async fn register(&self, _instance: &ServiceInstance, ttl: Duration) -> Result<String, ProviderError> {
        self.registers.lock().unwrap().push((self.started.elapsed(), ttl));
        let next = self.register_script.lock().unwrap().pop_front();
        next.unwrap_or(Ok(()))?;
        Ok(format!(
            "lease-{}",
            self.leases.fetch_add(1, Ordering::SeqCst) + 1
        ))
    }

    async fn keep_alive(&self, _instance: &ServiceInstance, lease: &str) -> Result<bool, ProviderError> {
        self.keep_alives
            .lock()
            .unwrap()
            .push((self.started.elapsed(), lease.to_owned()));
        Ok(self.keep_alive_script.lock().unwrap().pop_front().unwrap_or(true))
    }

    async fn deregister(&self, instance: &ServiceInstance, lease: Option<&str>) -> Result<(), ProviderError> {
        self.deregisters
            .lock()
            .unwrap()
            .push((instance.id.clone(), lease.map(str::to_owned)));
        Ok(())
    }
}
