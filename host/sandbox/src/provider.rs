//! One loaded provider: its compiled component, its grants and limits, and a small
//! pool of sandboxed instances (each its own `Store`) that run its calls.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use tracing::Instrument;
use wasd_core::text::{MAX_TEXT, excerpt, hex, sanitize};
use wasd_core::{
    Answer, Endpoint, Error, Imports, ProviderError, ProviderErrorKind, ProviderStatus, ServiceInstance,
    Source, SourceQuery,
};
use wasmtime::component::{Component, InstancePre, ResourceTable};
use wasmtime::{Store, UpdateDeadline};
use wasmtime_wasi::sockets::WasiSocketsCtxView;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::WasiHttpCtx;

use crate::bindings::{
    Configuration, File, GuestEndpoint, GuestError, GuestInstance, Query, RegistrarGuest, RegistrarIndices,
    Resolution, ResolverGuest, ResolverIndices,
};
use crate::capability::dns::DnsClient;
use crate::capability::http::{HttpHooks, HttpPolicy, TlsFiles};
use crate::capability::tcp::{self, Connects, TcpGrant};
use crate::engine::{EPOCH_TICK, Runtime};
use crate::inspect::{RESOLVER_EXPORT, Surface};
use crate::limits::{LimitExceeded, MemoryLimiter, StderrTail};
use crate::metrics::{Call, CallMetrics, Outcome, call_span, record_outcome};
use crate::quarantine::{Health, Mark};
use crate::spec::{Grants, InputFile, Limits, ModuleSource, ProviderSpec};

/// Idle instances kept per provider; more are created under concurrency and dropped.
const MAX_IDLE_INSTANCES: usize = 4;
/// Largest granted file the host reads for a provider.
const MAX_GRANTED_FILE: u64 = 16 << 20;
/// Calls (other than long-polling watches) one provider runs at once; each may hold an
/// instance with up to `max-memory`. More wait, for at most the call's time limit.
const MAX_CONCURRENT_CALLS: usize = 32;
/// Log lines one call may write; the rest are dropped (with one warning).
pub(crate) const MAX_LOG_LINES_PER_CALL: u32 = 1000;
/// Outgoing HTTP requests an instance sends before it is retired: wasmtime-wasi-http 48
/// never frees a request's `request-options` handle, so an instance's resource table
/// grows with every request.
const MAX_REQUESTS_PER_INSTANCE: u32 = 1000;
/// Calls an instance serves before it is retired, whatever it does: bounds guest heap
/// fragmentation. High, because a fresh instance runs `configure` again, which for a
/// large settings table costs milliseconds.
const MAX_CALLS_PER_INSTANCE: u32 = 100_000;
/// Limits on what crosses the boundary in an answer.
const MAX_HOST_LEN: usize = 253;
const MAX_SCHEME_LEN: usize = 32;
const MAX_PATH_LEN: usize = 2048;
const MAX_METADATA_PAIRS: usize = 64;
const MAX_METADATA_LEN: usize = 4096;
const MAX_VERSION_LEN: usize = 1024;

/// The data of one provider instance's store.
pub(crate) struct ProviderState {
    pub(crate) name: Arc<str>,
    pub(crate) grants: Arc<Grants>,
    pub(crate) dns: Arc<DnsClient>,
    wasi: WasiCtx,
    pub(crate) table: ResourceTable,
    pub(crate) http: WasiHttpCtx,
    pub(crate) http_hooks: HttpHooks,
    limiter: MemoryLimiter,
    pub(crate) deadline: Instant,
    timeout: Duration,
    /// Time the current call spends in host imports bounded by their own timeouts
    /// (DNS): not counted against the call's limit, so a slow upstream is reported as
    /// itself and not as the provider running out of time.
    pub(crate) imports: Arc<ImportTime>,
    /// Log lines the current call has written.
    pub(crate) log_lines: u32,
    /// Where the current call notes its DNS lookups, when it is being explained.
    pub(crate) journal: Option<Imports>,
    /// What `grants.tcp` lets through, and the connections this call opened.
    tcp: Arc<TcpGrant>,
    connects: Arc<Connects>,
}

impl ProviderState {
    /// Note this call's imports in `journal` (an explained resolve), or stop noting.
    fn note_imports(&mut self, journal: Option<&Imports>) {
        self.journal = journal.cloned();
        self.http_hooks.journal = journal.cloned();
    }

    /// wasi:sockets' view of this store, and the TCP grant (for name lookups).
    pub(crate) fn sockets_and_grant(&mut self) -> (WasiSocketsCtxView<'_>, &TcpGrant) {
        let sockets = WasiSocketsCtxView {
            ctx: self.wasi.sockets(),
            table: &mut self.table,
        };
        (sockets, &self.tcp)
    }
}

impl WasiView for ProviderState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

struct Instance {
    store: Store<ProviderState>,
    resolver: ResolverGuest,
    registrar: Option<RegistrarGuest>,
    stderr: StderrTail,
    calls: u32,
    /// The query of the last call, its buffers reused by the next (see [`lower_query`]).
    query: Query,
    _alive: Alive,
}

/// Counts an instance among its provider's live ones while it exists.
struct Alive(Arc<AtomicUsize>);

impl Alive {
    fn new(count: &Arc<AtomicUsize>) -> Alive {
        count.fetch_add(1, Ordering::Relaxed);
        Alive(count.clone())
    }
}

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One loaded provider: a [`Source`] whose calls run in sandboxed instances of its
/// component.
pub struct Provider {
    name: Arc<str>,
    runtime: Arc<Runtime>,
    pre: InstancePre<ProviderState>,
    resolver: ResolverIndices,
    /// Set when the component also exports `wasd:provider/registrar`.
    registrar: Option<RegistrarIndices>,
    configuration: Configuration,
    grants: Arc<Grants>,
    http: Arc<HttpPolicy>,
    tcp: Arc<TcpGrant>,
    env: Vec<(String, String)>,
    limits: Limits,
    // Boxed on purpose: an instance moves into each call's future (see `instantiate`).
    #[allow(clippy::vec_box)]
    idle: Mutex<Vec<Box<Instance>>>,
    /// Cleared when `watch` answers `unsupported`: the host polls this provider.
    watchable: AtomicBool,
    /// What it was made from; a reload whose inputs hash the same keeps it.
    fingerprint: [u8; 32],
    health: Health,
    busy: tokio::sync::Semaphore,
    metrics: CallMetrics,
    /// Instances alive: pooled or in a call.
    instances: Arc<AtomicUsize>,
}

/// A provider's inputs, read from disk: the module, granted files and TLS files. Two
/// reads with the same fingerprint make the same provider.
pub struct Prepared {
    spec: ProviderSpec,
    bytes: Arc<[u8]>,
    /// The module's sha256: computed once, for the pin, the fingerprint and the cache.
    digest: [u8; 32],
    files: Vec<File>,
    tls: TlsFiles,
    fingerprint: [u8; 32],
}

impl Prepared {
    /// Read everything `spec` names ([`ProviderSpec::input_files`]) and fingerprint it.
    pub async fn read(spec: &ProviderSpec) -> Result<Prepared, Error> {
        let load_error = |reason: String| spec.load_error(reason);
        let mut bytes: Arc<[u8]> = match &spec.module {
            ModuleSource::Builtin(builtin) => builtin.wasm().into(),
            ModuleSource::File(_) => Arc::new([]),
        };
        let mut files = Vec::new();
        let mut tls = TlsFiles::default();
        let mut client_cert = None;
        for input in spec.input_files() {
            match input {
                InputFile::Module(path) => {
                    bytes = tokio::fs::read(path)
                        .await
                        .map_err(|e| load_error(format!("cannot read the module: {e}")))?
                        .into();
                    if bytes.is_empty() {
                        return Err(load_error(
                            "the module file is empty (a copy still in progress?)".into(),
                        ));
                    }
                }
                InputFile::Granted(written, path) => match read_granted_file(path).await {
                    Ok(Some(contents)) => files.push(File {
                        path: written.to_owned(),
                        contents,
                    }),
                    Ok(None) => {
                        tracing::debug!(provider = %spec.name, file = %path.display(), "granted file does not exist")
                    }
                    Err(reason) => return Err(load_error(format!("{}: {reason}", path.display()))),
                },
                InputFile::CaFile(path) => tls.ca = Some(read_tls_file(path).await.map_err(load_error)?),
                InputFile::ClientCert(path) => {
                    client_cert = Some(read_tls_file(path).await.map_err(load_error)?)
                }
                InputFile::ClientKey(path) => {
                    let key = read_tls_file(path).await.map_err(load_error)?;
                    tls.client = client_cert.take().map(|cert| (cert, key));
                }
            }
        }
        let digest: [u8; 32] = Sha256::digest(&bytes).into();
        if let Some(pin) = &spec.sha256 {
            let actual = hex(&digest);
            if &actual != pin {
                return Err(load_error(format!(
                    "refused: its sha256 is {actual}, the config pins {pin}"
                )));
            }
        }
        let mut sha = Sha256::new();
        let mut field = |bytes: &[u8]| {
            sha.update((bytes.len() as u64).to_le_bytes());
            sha.update(bytes);
        };
        field(spec.name.as_bytes());
        field(spec.module.to_string().as_bytes());
        field(&digest);
        field(spec.settings.as_bytes());
        field(format!("{:?}{:?}{:?}", spec.grants, spec.limits, spec.tls).as_bytes());
        for file in &files {
            field(file.path.as_bytes());
            field(&file.contents);
        }
        for pem in [
            tls.ca.as_deref(),
            tls.client.as_ref().map(|c| &*c.0),
            tls.client.as_ref().map(|c| &*c.1),
        ] {
            field(pem.unwrap_or_default());
        }
        Ok(Prepared {
            spec: spec.clone(),
            bytes,
            digest,
            files,
            tls,
            fingerprint: sha.finalize().into(),
        })
    }

    /// The hash of everything read: equal fingerprints make equal providers.
    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }

    /// What it was read for.
    pub fn spec(&self) -> &ProviderSpec {
        &self.spec
    }
}

/// A component linked against the host's imports, its exports found.
pub(crate) struct Linked {
    pre: InstancePre<ProviderState>,
    resolver: ResolverIndices,
    registrar: Option<RegistrarIndices>,
}

impl Provider {
    /// Read, compile, link, instantiate and configure: a provider that loads has
    /// answered `configure` once, so bad settings fail here and not on the first query.
    pub async fn load(runtime: &Arc<Runtime>, spec: &ProviderSpec) -> Result<Provider, Error> {
        Provider::load_prepared(runtime, Prepared::read(spec).await?).await
    }

    /// Compile, link, instantiate and configure what [`Prepared::read`] read.
    pub async fn load_prepared(runtime: &Arc<Runtime>, prepared: Prepared) -> Result<Provider, Error> {
        let component = Provider::compile(runtime, &prepared).await?;
        Provider::link(runtime, prepared, component).await
    }

    /// Compile (or load precompiled) what [`Prepared::read`] read.
    pub(crate) async fn compile(runtime: &Arc<Runtime>, prepared: &Prepared) -> Result<Component, Error> {
        runtime
            .compile(prepared.bytes.clone(), prepared.digest, &prepared.spec.name)
            .await
            .map_err(|e| prepared.spec.load_error(format!("not a loadable component: {e}")))
    }

    /// Link, instantiate and configure a compiled component.
    pub(crate) async fn link(
        runtime: &Arc<Runtime>,
        prepared: Prepared,
        component: Component,
    ) -> Result<Provider, Error> {
        let linked = Provider::link_exports(runtime, &component)
            .map_err(|problems| prepared.spec.load_error(problems.join("; ")))?;
        Provider::start(runtime, prepared, linked).await
    }

    /// Link a component against the host's imports and find its exports; on failure,
    /// what is wrong, one line each. The component's own imports and exports explain
    /// a failure better than the linker's first complaint, when they account for it.
    pub(crate) fn link_exports(runtime: &Runtime, component: &Component) -> Result<Linked, Vec<String>> {
        let explained = |fallback: String| {
            let problems = Surface::of(component, &runtime.engine).problems();
            if problems.is_empty() {
                vec![fallback]
            } else {
                problems
            }
        };
        let pre = runtime
            .linker
            .instantiate_pre(component)
            .map_err(|e| explained(format!("cannot link: {e:#}")))?;
        let resolver = ResolverIndices::new(&pre)
            .map_err(|e| explained(format!("does not export {RESOLVER_EXPORT}: {e:#}")))?;
        let registrar = RegistrarIndices::new(&pre).ok();
        Ok(Linked {
            pre,
            resolver,
            registrar,
        })
    }

    /// Instantiate and configure a linked component: a provider ready to serve.
    pub(crate) async fn start(
        runtime: &Arc<Runtime>,
        prepared: Prepared,
        linked: Linked,
    ) -> Result<Provider, Error> {
        let Prepared {
            spec,
            files,
            tls,
            fingerprint,
            ..
        } = prepared;
        let Linked {
            pre,
            resolver,
            registrar,
        } = linked;
        let load_error = |reason: String| spec.load_error(reason);
        let env = runtime.environment_for(&spec.grants);
        let name: Arc<str> = spec.name.as_str().into();
        let http = HttpPolicy::new(name.clone(), &spec.grants.http, tls)
            .map_err(|e| load_error(format!("tls: {e}")))?;
        let metrics = CallMetrics::new(&name);
        let provider = Provider {
            configuration: Configuration {
                name: spec.name.clone(),
                settings: spec.settings.clone(),
                files,
            },
            name,
            runtime: runtime.clone(),
            pre,
            resolver,
            registrar,
            grants: Arc::new(spec.grants.clone()),
            http: Arc::new(http),
            tcp: Arc::new(TcpGrant::new(&spec.grants.tcp)),
            env,
            limits: spec.limits,
            idle: Mutex::new(Vec::new()),
            watchable: AtomicBool::new(true),
            fingerprint,
            health: Health::new(),
            busy: tokio::sync::Semaphore::new(MAX_CONCURRENT_CALLS),
            metrics,
            instances: Arc::default(),
        };
        let instance = provider
            .instantiate()
            .await
            .map_err(|e| load_error(e.kind.to_string()))?;
        provider.checkin(instance);
        Ok(provider)
    }

    fn error(&self, kind: ProviderErrorKind) -> ProviderError {
        ProviderError::new(&*self.name, kind)
    }

    /// A fresh sandbox: no files, no network, only the granted environment variables;
    /// stdout discarded, stderr kept to explain traps.
    async fn instantiate(&self) -> Result<Box<Instance>, ProviderError> {
        let stderr = StderrTail::default();
        let connects = Arc::new(Connects::default());
        let mut wasi = WasiCtx::builder();
        wasi.envs(&self.env).stderr(stderr.clone());
        tcp::configure(&mut wasi, &self.tcp, &connects);
        let wasi = wasi.build();
        let mut store = Store::new(
            &self.runtime.engine,
            ProviderState {
                name: self.name.clone(),
                grants: self.grants.clone(),
                dns: self.runtime.dns.clone(),
                wasi,
                table: ResourceTable::new(),
                http: WasiHttpCtx::new(),
                http_hooks: HttpHooks::new(self.http.clone()),
                limiter: MemoryLimiter {
                    max_memory: self.limits.max_memory,
                },
                deadline: Instant::now(),
                timeout: self.limits.timeout,
                imports: Arc::default(),
                log_lines: 0,
                journal: None,
                tcp: self.tcp.clone(),
                connects,
            },
        );
        store.limiter(|state| &mut state.limiter);
        // Each epoch tick yields to tokio, so a busy guest never stalls other tasks;
        // past the deadline the call traps.
        store.epoch_deadline_callback(|ctx| {
            let state = ctx.data();
            if Instant::now() >= state.deadline {
                return Err(wasmtime::Error::new(LimitExceeded(format!(
                    "time limit ({} ms per call)",
                    state.timeout.as_millis()
                ))));
            }
            Ok(UpdateDeadline::Yield(1))
        });
        arm_deadline(&mut store, self.limits.timeout);
        let loaded = async {
            let instance = self.pre.instantiate_async(&mut store).await?;
            let resolver = self.resolver.load(&mut store, &instance)?;
            let registrar = match &self.registrar {
                Some(indices) => Some(indices.load(&mut store, &instance)?),
                None => None,
            };
            wasmtime::Result::Ok((resolver, registrar))
        };
        let (resolver, registrar) = match loaded.await {
            Ok(loaded) => loaded,
            Err(e) => return Err(self.error(classify(&e, &stderr))),
        };
        // Boxed: a call's future holds the instance while it runs, and the chain boxes
        // that future; a pointer keeps it small.
        let mut instance = Box::new(Instance {
            store,
            resolver,
            registrar,
            stderr,
            calls: 0,
            query: Query {
                service: String::new(),
                endpoint_name: None,
                schemes: Vec::new(),
                port: None,
            },
            _alive: Alive::new(&self.instances),
        });
        let configuration = self.configuration.clone();
        self.call(&mut instance, self.limits.timeout, async |i: &mut Instance| {
            i.resolver.call_configure(&mut i.store, &configuration).await
        })
        .await?
        .map_err(|e| self.error(guest_error(e)))?;
        Ok(instance)
    }

    /// Run one export call under a deadline of `timeout`. A trap or timeout poisons
    /// the instance, so it is returned only when the call came back normally.
    async fn call<T>(
        &self,
        instance: &mut Instance,
        timeout: Duration,
        f: impl AsyncFnOnce(&mut Instance) -> wasmtime::Result<T>,
    ) -> Result<T, ProviderError> {
        arm_deadline(&mut instance.store, timeout);
        // A trap is explained by what this call wrote, not by an earlier one.
        instance.stderr.clear();
        // The epoch deadline only fires while wasm runs; time spent awaiting a host
        // import is bounded here, with slack so the epoch trap (the clearer error)
        // normally comes first.
        let hard_limit = timeout + EPOCH_TICK * 5;
        let imports = instance.store.data().imports.clone();
        let started = tokio::time::Instant::now();
        let stderr = instance.stderr.clone();
        let call = f(instance);
        tokio::pin!(call);
        // The timer lives on the heap, made only when the call does not finish on its
        // first poll (most do): registering a timer wakes the runtime's driver (a
        // syscall, as costly as the call), and one held inline would make every call's
        // future larger (the chain boxes it: docs/BENCHMARKS.md, "The layered host").
        let mut timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
        let mut spent = imports.spent();
        let mut deadline = started + hard_limit + spent;
        loop {
            tokio::select! {
                biased;
                result = &mut call => {
                    return result.map_err(|e| self.error(classify(&e, &stderr)));
                }
                () = expire(&mut timer, deadline) => {
                    // An import in progress, or one that ended since the deadline was
                    // set, moves the limit on; the import is bounded by its own timeout.
                    if (!imports.busy() || imports.used_up()) && imports.spent() == spent {
                        return Err(self.error(ProviderErrorKind::Limit(format!(
                            "time limit ({} ms per call)",
                            timeout.as_millis()
                        ))));
                    }
                    spent = imports.spent();
                    deadline = started + hard_limit + spent;
                    if imports.busy() {
                        // Look again in a tick while the import runs.
                        deadline = deadline.max(tokio::time::Instant::now() + EPOCH_TICK);
                    }
                }
            }
        }
    }

    /// Check an instance out, run one call on it, and put it back if it survived.
    /// A quarantined provider is not called at all.
    async fn with_instance<T>(
        &self,
        timeout: Duration,
        f: impl AsyncFnOnce(&mut Instance) -> wasmtime::Result<T>,
    ) -> Result<T, ProviderError> {
        self.with_instance_of(timeout, true, f).await
    }

    /// `bounded`: the call counts against [`MAX_CONCURRENT_CALLS`] (watches do not:
    /// they wait, they do not work, and there is one per watched query).
    async fn with_instance_of<T>(
        &self,
        timeout: Duration,
        bounded: bool,
        f: impl AsyncFnOnce(&mut Instance) -> wasmtime::Result<T>,
    ) -> Result<T, ProviderError> {
        if let Some((left, faults)) = self.health.quarantined() {
            return Err(self.error(ProviderErrorKind::Quarantined(format!(
                "{faults} faults in a row; not called for another {} ms",
                left.as_millis()
            ))));
        }
        let _permit = if bounded {
            match tokio::time::timeout(self.limits.timeout, self.busy.acquire()).await {
                Ok(permit) => Some(permit.expect("the semaphore is never closed")),
                // Not the provider's fault: no fault is counted.
                Err(_) => {
                    return Err(self.error(ProviderErrorKind::Limit(format!(
                        "concurrency limit ({MAX_CONCURRENT_CALLS} calls at once)"
                    ))));
                }
            }
        } else {
            None
        };
        let called = async {
            let mut instance = self.checkout().await?;
            let value = self.call(&mut instance, timeout, f).await?;
            instance.calls += 1;
            self.checkin(instance);
            Ok(value)
        };
        let result = called.await;
        // A success is recorded by the caller, once the answer is checked too.
        if let Err(failure) = &result {
            self.fault(failure);
        }
        result
    }

    /// Count a fault (a trap, a limit, a broken answer), quarantining the provider
    /// when they come in a row.
    fn fault(&self, failure: &ProviderError) {
        if let Some(length) = self.health.fault() {
            tracing::warn!(
                provider = %self.name,
                quarantine_ms = length.as_millis() as u64,
                "quarantined after repeated faults; the chain goes on without it meanwhile: {failure}"
            );
        }
    }

    async fn checkout(&self) -> Result<Box<Instance>, ProviderError> {
        let pooled = self.idle.lock().expect("pool lock").pop();
        match pooled {
            Some(instance) => Ok(instance),
            // Boxed: instantiating is rare, and its future (wasmtime's instantiation and a
            // `configure` call) is large; inline, every call's future would carry (and
            // copy) its size.
            None => Box::pin(self.instantiate()).await,
        }
    }

    fn checkin(&self, instance: Box<Instance>) {
        if instance.calls >= MAX_CALLS_PER_INSTANCE
            || instance.store.data().http_hooks.requests >= MAX_REQUESTS_PER_INSTANCE
        {
            return;
        }
        let mut idle = self.idle.lock().expect("pool lock");
        if idle.len() < MAX_IDLE_INSTANCES {
            idle.push(instance);
        }
    }

    /// Run one registrar call; `unsupported` when the component is not a registrar.
    async fn registrar_call<T>(
        &self,
        call: Call,
        f: impl AsyncFnOnce(&RegistrarGuest, &mut Store<ProviderState>) -> wasmtime::Result<Result<T, GuestError>>,
    ) -> Result<T, ProviderError> {
        self.measured(call, async {
            let result = self.registrar_call_unmeasured(f).await;
            let outcome = match &result {
                Ok(_) => Outcome::Answered,
                Err(failure) => Outcome::of(failure),
            };
            (result, outcome)
        })
        .await
    }

    /// Run one call in its span, then record how it ended (the outcome `run` gives
    /// with its result) in the metrics and on the span.
    ///
    /// A future of its own ([`Measured`]), not an `async fn` taking `run`: that would
    /// hold `run` twice in its state (the argument, then the future awaited), and the
    /// call's future, boxed on every resolve, would be twice as large to allocate and
    /// fill (about 200 ns a call, measured).
    fn measured<T, F>(&self, call: Call, run: F) -> tracing::instrument::Instrumented<Measured<'_, F>>
    where
        F: Future<Output = (Result<T, ProviderError>, Outcome)>,
    {
        Measured {
            run,
            metrics: &self.metrics,
            call,
            began: Instant::now(),
        }
        .instrument(call_span(&self.name, call))
    }

    async fn registrar_call_unmeasured<T>(
        &self,
        f: impl AsyncFnOnce(&RegistrarGuest, &mut Store<ProviderState>) -> wasmtime::Result<Result<T, GuestError>>,
    ) -> Result<T, ProviderError> {
        if self.registrar.is_none() {
            return Err(self.error(ProviderErrorKind::Unsupported(
                "this provider does not export wasd:provider/registrar".into(),
            )));
        }
        let started = self.health.mark();
        let result = self
            .with_instance(self.limits.timeout, async |i: &mut Instance| {
                let registrar = i.registrar.as_ref().expect("loaded with the provider");
                f(registrar, &mut i.store).await
            })
            .await?;
        self.health.success(started);
        result.map_err(|e| self.error(guest_error(e)))
    }

    /// [`Source::resolve`] and [`Source::resolve_explained`] (noting imports in
    /// `journal`): one call, measured.
    ///
    /// (Not an `async fn`: one layer less in the call's future.)
    fn resolve_measured<'a>(
        &'a self,
        query: &'a SourceQuery,
        journal: Option<&'a Imports>,
    ) -> impl Future<Output = Result<Answer, ProviderError>> + 'a {
        self.measured(Call::Resolve, async move {
            let mut not_found = false;
            let result = self.resolve_call(query, journal, &mut not_found).await;
            let outcome = match &result {
                _ if not_found => Outcome::NotFound,
                Ok(answer) => Outcome::of_answer(answer),
                Err(failure) => Outcome::of(failure),
            };
            (result, outcome)
        })
    }

    /// [`Provider::resolve_measured`], its metrics aside; `not_found` is set when the
    /// provider said `not-found` (an empty answer to the chain).
    async fn resolve_call(
        &self,
        query: &SourceQuery,
        journal: Option<&Imports>,
        not_found: &mut bool,
    ) -> Result<Answer, ProviderError> {
        let started = self.health.mark();
        let result = self
            .with_instance(self.limits.timeout, async |i: &mut Instance| {
                lower_query(&mut i.query, query);
                if journal.is_some() {
                    i.store.data_mut().note_imports(journal);
                }
                let result = i.resolver.call_resolve(&mut i.store, &i.query).await;
                if journal.is_some() {
                    // Pooled, the instance serves unexplained calls next.
                    i.store.data_mut().note_imports(None);
                }
                result
            })
            .await?;
        match result {
            Ok(resolution) => self.check_answer(resolution, started),
            Err(e) => {
                // The provider ran and spoke for itself: not a fault.
                self.health.success(started);
                match e {
                    GuestError::NotFound(_) => {
                        *not_found = true;
                        Ok(Answer::default())
                    }
                    e => Err(self.error(guest_error(e))),
                }
            }
        }
    }

    /// [`Source::watch`], its metrics aside.
    async fn watch_call(
        &self,
        query: &SourceQuery,
        version: &str,
        wait: Duration,
    ) -> Result<Option<Answer>, ProviderError> {
        let wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
        let started = self.health.mark();
        let result = self
            .with_instance_of(wait + self.limits.timeout, false, async |i: &mut Instance| {
                lower_query(&mut i.query, query);
                i.resolver
                    .call_watch(&mut i.store, &i.query, version, wait_ms)
                    .await
            })
            .await?;
        match result {
            Ok(Some(resolution)) => self.check_answer(resolution, started).map(Some),
            Ok(None) => {
                self.health.success(started);
                Ok(None)
            }
            Err(e) => {
                self.health.success(started);
                match e {
                    GuestError::NotFound(_) => Ok(Some(Answer::default())),
                    e => {
                        if matches!(e, GuestError::Unsupported(_)) {
                            // The host polls this provider from now on.
                            self.watchable.store(false, Ordering::Relaxed);
                        }
                        Err(self.error(guest_error(e)))
                    }
                }
            }
        }
    }

    /// Check an answer against the contract and the provider's limits, and convert it.
    fn check_answer(&self, resolution: Resolution, started: Mark) -> Result<Answer, ProviderError> {
        let refuse = |reason: String| {
            let failure = self.error(ProviderErrorKind::InvalidAnswer(reason));
            self.fault(&failure);
            Err(failure)
        };
        if resolution.endpoints.len() > self.limits.max_endpoints {
            return refuse(format!(
                "{} endpoints, more than its limit of {} (limits.max-endpoints)",
                resolution.endpoints.len(),
                self.limits.max_endpoints
            ));
        }
        if resolution
            .version
            .as_ref()
            .is_some_and(|v| v.len() > MAX_VERSION_LEN)
        {
            return refuse(format!("a version longer than {MAX_VERSION_LEN} bytes"));
        }
        let mut endpoints = Vec::with_capacity(resolution.endpoints.len());
        for endpoint in resolution.endpoints {
            match check_endpoint(endpoint) {
                Ok(endpoint) => endpoints.push(endpoint),
                Err(reason) => return refuse(reason),
            }
        }
        self.health.success(started);
        let mut answer = Answer::new(endpoints);
        answer.ttl = resolution.ttl_ms.map(Duration::from_millis);
        answer.version = resolution.version;
        Ok(answer)
    }
}

pin_project_lite::pin_project! {
    /// A provider call being measured ([`Provider::measured`]): when `run` ends, its
    /// outcome goes to the metrics and the current (the call's) span.
    pub(crate) struct Measured<'a, F> {
        #[pin]
        run: F,
        metrics: &'a CallMetrics,
        call: Call,
        began: Instant,
    }
}

impl<T, F> Future for Measured<'_, F>
where
    F: Future<Output = (Result<T, ProviderError>, Outcome)>,
{
    type Output = Result<T, ProviderError>;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        let this = self.project();
        let (result, outcome) = std::task::ready!(this.run.poll(cx));
        this.metrics.record(*this.call, outcome, *this.began);
        record_outcome(outcome);
        std::task::Poll::Ready(result)
    }
}

/// The WIT query for a core query.
/// Copy `query` into an instance's WIT query, reusing its buffers (`clone_from`): after
/// an instance's first call, passing the query allocates nothing.
fn lower_query(target: &mut Query, query: &SourceQuery) {
    target.service.clone_from(&query.service);
    target.endpoint_name.clone_from(&query.endpoint_name);
    target.schemes.clone_from(&query.schemes);
    target.port = query.port;
}

/// The WIT instance for a core instance.
fn wit_instance(instance: &ServiceInstance) -> GuestInstance {
    GuestInstance {
        id: instance.id.clone(),
        name: instance.name.clone(),
        version: instance.version.clone(),
        metadata: instance.metadata.clone().into_iter().collect(),
        endpoints: instance.endpoints.clone(),
    }
}

#[async_trait]
impl Source for Provider {
    fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// Ask the provider. `not-found` is the same as an empty answer.
    async fn resolve(&self, query: &SourceQuery) -> Result<Answer, ProviderError> {
        self.resolve_measured(query, None).await
    }

    /// Its DNS lookups and HTTP requests are noted as they end.
    async fn resolve_explained(
        &self,
        query: &SourceQuery,
        imports: &Imports,
    ) -> Result<Answer, ProviderError> {
        self.resolve_measured(query, Some(imports)).await
    }

    /// The call may last `wait` plus the provider's usual time limit.
    async fn watch(
        &self,
        query: &SourceQuery,
        version: &str,
        wait: Duration,
    ) -> Result<Option<Answer>, ProviderError> {
        self.measured(Call::Watch, async {
            let result = self.watch_call(query, version, wait).await;
            let outcome = match &result {
                Ok(Some(answer)) => Outcome::of_answer(answer),
                Ok(None) => Outcome::Empty,
                Err(failure) => Outcome::of(failure),
            };
            (result, outcome)
        })
        .await
    }

    fn can_watch(&self) -> bool {
        self.watchable.load(Ordering::Relaxed)
    }

    /// Whether the component exports `wasd:provider/registrar`.
    fn is_registrar(&self) -> bool {
        self.registrar.is_some()
    }

    async fn register(&self, instance: &ServiceInstance, ttl: Duration) -> Result<String, ProviderError> {
        let instance = wit_instance(instance);
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        let lease = self
            .registrar_call(Call::Register, async |r, store| {
                r.call_register(store, &instance, ttl_ms).await
            })
            .await?;
        if lease.len() > MAX_VERSION_LEN {
            return Err(self.error(ProviderErrorKind::InvalidAnswer(format!(
                "a lease id longer than {MAX_VERSION_LEN} bytes"
            ))));
        }
        Ok(lease)
    }

    async fn keep_alive(&self, instance: &ServiceInstance, lease: &str) -> Result<bool, ProviderError> {
        let instance = wit_instance(instance);
        self.registrar_call(Call::KeepAlive, async |r, store| {
            r.call_keep_alive(store, &instance, lease).await
        })
        .await
    }

    async fn deregister(&self, instance: &ServiceInstance, lease: Option<&str>) -> Result<(), ProviderError> {
        let instance = wit_instance(instance);
        self.registrar_call(Call::Deregister, async |r, store| {
            r.call_deregister(store, &instance, lease).await
        })
        .await
    }

    fn status(&self) -> ProviderStatus {
        let mut status = self.health.status(&self.name);
        status.instances = Some(self.instances.load(Ordering::Relaxed));
        status
    }

    fn fingerprint(&self) -> Option<[u8; 32]> {
        Some(self.fingerprint)
    }
}

/// Time one call spends in host imports that have timeouts of their own.
#[derive(Debug, Default)]
pub(crate) struct ImportTime {
    /// Milliseconds spent in finished imports.
    spent_ms: AtomicU64,
    /// Imports in progress.
    busy: AtomicU64,
    /// Most milliseconds set aside per call (the call's own limit again): a guest that
    /// keeps looking names up still ends, at twice its limit at most.
    cap_ms: AtomicU64,
}

impl ImportTime {
    fn reset(&self, cap: Duration) {
        self.spent_ms.store(0, Ordering::Relaxed);
        self.cap_ms.store(cap.as_millis() as u64, Ordering::Relaxed);
    }

    /// Time set aside so far, at most the cap.
    fn spent(&self) -> Duration {
        Duration::from_millis(
            self.spent_ms
                .load(Ordering::Relaxed)
                .min(self.cap_ms.load(Ordering::Relaxed)),
        )
    }

    /// Whether the call has used up the time it may spend in imports.
    pub(crate) fn used_up(&self) -> bool {
        self.spent_ms.load(Ordering::Relaxed) >= self.cap_ms.load(Ordering::Relaxed)
    }

    fn busy(&self) -> bool {
        self.busy.load(Ordering::Relaxed) > 0
    }

    /// Run `import`, its time set aside from the call's limit.
    pub(crate) async fn exempt<T>(&self, import: impl std::future::Future<Output = T>) -> (T, Duration) {
        self.busy.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let result = import.await;
        let spent = started.elapsed();
        self.spent_ms
            .fetch_add(spent.as_millis() as u64, Ordering::Relaxed);
        self.busy.fetch_sub(1, Ordering::Relaxed);
        (result, spent)
    }
}

fn arm_deadline(store: &mut Store<ProviderState>, timeout: Duration) {
    let state = store.data_mut();
    state.deadline = Instant::now() + timeout;
    state.timeout = timeout;
    state.imports.reset(timeout);
    state.log_lines = 0;
    state.connects.reset();
    store.set_epoch_deadline(1);
}

async fn read_tls_file(path: &std::path::Path) -> Result<Vec<u8>, String> {
    match read_granted_file(path).await {
        Ok(Some(bytes)) => Ok(bytes),
        Ok(None) => Err(format!("tls: {} does not exist", path.display())),
        Err(e) => Err(format!("tls: {}: {e}", path.display())),
    }
}

async fn read_granted_file(path: &std::path::Path) -> Result<Option<Vec<u8>>, String> {
    let file = match tokio::fs::File::open(path).await {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let len = file.metadata().await.map_err(|e| e.to_string())?.len();
    if len > MAX_GRANTED_FILE {
        return Err(format!(
            "{len} bytes, larger than the {MAX_GRANTED_FILE}-byte limit for granted files"
        ));
    }
    tokio::fs::read(path).await.map(Some).map_err(|e| e.to_string())
}

/// A provider's own error, its message capped: it is the provider's text.
fn guest_error(e: GuestError) -> ProviderErrorKind {
    let text = |m: String| sanitize(&m, MAX_TEXT);
    match e {
        GuestError::NotFound(m) => ProviderErrorKind::Internal(format!("not found: {}", text(m))),
        GuestError::InvalidQuery(m) => ProviderErrorKind::InvalidQuery(text(m)),
        GuestError::InvalidSettings(m) => ProviderErrorKind::InvalidSettings(text(m)),
        GuestError::Unavailable(m) => ProviderErrorKind::Unavailable(text(m)),
        GuestError::Denied(m) => ProviderErrorKind::Denied(text(m)),
        GuestError::Unsupported(m) => ProviderErrorKind::Unsupported(text(m)),
        GuestError::Internal(m) => ProviderErrorKind::Internal(text(m)),
    }
}

/// Tell a limit from a trap, and add what the guest last wrote to stderr (a Rust
/// guest's panic message lands there).
fn classify(e: &wasmtime::Error, stderr: &StderrTail) -> ProviderErrorKind {
    if let Some(limit) = e.chain().find_map(|c| c.downcast_ref::<LimitExceeded>()) {
        return ProviderErrorKind::Limit(limit.0.clone());
    }
    if let Some(trap) = e.chain().find_map(|c| c.downcast_ref::<wasmtime::Trap>()) {
        if *trap == wasmtime::Trap::StackOverflow {
            return ProviderErrorKind::Limit("stack limit (stack overflow)".into());
        }
        return ProviderErrorKind::Trap(match panic_message(&stderr.contents()) {
            Some(message) => format!("{trap} ({message})"),
            None => trap.to_string(),
        });
    }
    // wasmtime's text can carry guest-chosen names (a component's name section).
    ProviderErrorKind::Trap(sanitize(&format!("{e:#}"), MAX_TEXT))
}

/// The last panic message a Rust guest wrote to stderr (`panicked at src/lib.rs:7:9:`
/// then the message), on one line, without the backtrace hint.
fn panic_message(stderr: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(stderr);
    let start = text.rfind("panicked at ")?;
    let message: Vec<&str> = text[start..]
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with("note: "))
        .collect();
    // The guest wrote it: control characters escaped (no terminal sequences, no
    // forged log lines), at most 300 characters.
    Some(sanitize(&message.join(" "), 300))
}

fn check_endpoint(e: GuestEndpoint) -> Result<Endpoint, String> {
    let host_ok = !e.host.is_empty()
        && e.host.len() <= MAX_HOST_LEN
        // Bytes, not chars: any non-ASCII character fails either way.
        && e.host
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b':'));
    if !host_ok {
        return Err(format!(
            "host '{}' is not a host name or IP address",
            excerpt(&e.host)
        ));
    }
    if e.host.contains(':') && e.host.parse::<std::net::Ipv6Addr>().is_err() {
        return Err(format!("host '{}' is not an IPv6 address", excerpt(&e.host)));
    }
    if let Some(scheme) = &e.scheme {
        let ok = scheme.len() <= MAX_SCHEME_LEN
            && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'-' | b'.'));
        if !ok {
            return Err(format!("scheme '{}' is not valid", excerpt(scheme)));
        }
    }
    if let Some(path) = &e.path
        && (!path.starts_with('/')
            || path.len() > MAX_PATH_LEN
            || path.chars().any(|c| c.is_whitespace() || c.is_control()))
    {
        return Err(format!("path '{}' is not a URI path", excerpt(path)));
    }
    if e.metadata.len() > MAX_METADATA_PAIRS
        || e.metadata
            .iter()
            .any(|(k, v)| k.len() > MAX_METADATA_LEN || v.len() > MAX_METADATA_LEN)
    {
        return Err(format!(
            "metadata over its limits ({MAX_METADATA_PAIRS} pairs of at most {MAX_METADATA_LEN} bytes)"
        ));
    }
    // Lowercased in place: the lifted strings are ours, so no second allocation each.
    let (mut scheme, mut host) = (e.scheme, e.host);
    if let Some(scheme) = &mut scheme {
        scheme.make_ascii_lowercase();
    }
    host.make_ascii_lowercase();
    Ok(Endpoint::from_parts(scheme, host, e.port, e.path, e.metadata))
}

/// Wait until `deadline` on a call's timer, made on first use and moved when the
/// deadline moves.
async fn expire(timer: &mut Option<Pin<Box<tokio::time::Sleep>>>, deadline: tokio::time::Instant) {
    let sleep = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
    if sleep.deadline() != deadline {
        sleep.as_mut().reset(deadline);
    }
    sleep.as_mut().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(scheme: Option<&str>, host: &str, path: Option<&str>) -> GuestEndpoint {
        GuestEndpoint {
            scheme: scheme.map(str::to_owned),
            host: host.to_owned(),
            port: Some(443),
            path: path.map(str::to_owned),
            metadata: vec![("Zone".into(), "EU-West".into())],
        }
    }

    #[test]
    fn an_answer_s_scheme_and_host_are_lowercased_and_the_rest_kept() {
        let checked = check_endpoint(endpoint(Some("HTTPS"), "Catalog.Example.COM", Some("/Api"))).unwrap();
        assert_eq!(checked.scheme(), Some("https"));
        assert_eq!(checked.host(), "catalog.example.com");
        assert_eq!(checked.port(), Some(443));
        // Paths and metadata are case-sensitive: kept as the provider wrote them.
        assert_eq!(checked.path(), Some("/Api"));
        assert_eq!(checked.metadata_value("Zone"), Some("EU-West"));
        let bare = check_endpoint(endpoint(None, "FE80::1", None)).unwrap();
        assert_eq!((bare.scheme(), bare.host()), (None, "fe80::1"));
    }

    #[test]
    fn an_answer_s_bad_parts_are_refused_by_name() {
        for (e, want) in [
            (endpoint(None, "", None), "host '' is not a host name"),
            (endpoint(None, "a b", None), "host 'a b' is not a host name"),
            (
                endpoint(None, "café.example", None),
                "host 'caf\\u{e9}.example' is not a host name",
            ),
            (
                endpoint(None, "1:2:x", None),
                "host '1:2:x' is not an IPv6 address",
            ),
            (endpoint(Some("1http"), "h", None), "scheme '1http' is not valid"),
            (
                endpoint(Some("httpé"), "h", None),
                "scheme 'http\\u{e9}' is not valid",
            ),
            (
                endpoint(Some("h"), "h", Some("api")),
                "path 'api' is not a URI path",
            ),
        ] {
            let err = check_endpoint(e).unwrap_err();
            assert!(err.starts_with(want), "{err}");
        }
    }
}
