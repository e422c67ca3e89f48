//! The `wasd` command: resolve, pick, watch, serve, check and register, on top of the
//! library.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use serde_json::json;
use std::time::Duration;
use tracing_subscriber::Layer;
use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use wasd::{Config, EndpointSet, Query, RegistrationState, Resolver, ServiceInstance};

/// Service discovery whose providers are sandboxed WebAssembly components.
#[derive(Parser)]
#[command(name = "wasd", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Resolve a query (`basket`, `https+http://catalog`, `https://_dashboard.basket`)
    /// and print its endpoints, one per line.
    Resolve {
        /// The service query.
        query: String,
        #[command(flatten)]
        filters: FilterArgs,
        #[command(flatten)]
        config: ConfigArgs,
        /// Print one JSON object instead.
        #[arg(long)]
        json: bool,
        /// Explain the answer instead: the schemes asked for, each provider in chain
        /// order with its outcome, time and the DNS names and HTTP origins it asked,
        /// the endpoints dropped and why, and the cache state. Exits 1 when the
        /// query has no endpoints, after explaining why.
        #[arg(long)]
        explain: bool,
    },
    /// Print a query's endpoints, then one line per change, until interrupted.
    Watch {
        /// The service query.
        query: String,
        #[command(flatten)]
        filters: FilterArgs,
        #[command(flatten)]
        config: ConfigArgs,
        /// Print one JSON object per line instead.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        metrics: MetricsArgs,
    },
    /// Serve discovery to every language until SIGINT/SIGTERM: a DNS server
    /// authoritative for one zone and a JSON HTTP API, over the provider chain (hot
    /// reload, caching, watches).
    Serve {
        #[command(flatten)]
        config: ConfigArgs,
        /// The HTTP API's address. Default: [serve] http, else 127.0.0.1:8585.
        #[arg(long, value_name = "ADDR")]
        http: Option<std::net::SocketAddr>,
        /// The DNS server's address (UDP and TCP). Default: [serve] dns, else
        /// 127.0.0.1:8653.
        #[arg(long, value_name = "ADDR")]
        dns: Option<std::net::SocketAddr>,
        /// The zone the DNS server answers for. Default: [serve] dns-zone, else
        /// wasd.internal.
        #[arg(long, value_name = "ZONE")]
        dns_zone: Option<String>,
        /// Serve xDS (ADS, for gRPC clients' `xds:///NAME`) on this address. Default:
        /// [serve] xds, else none.
        #[arg(long, value_name = "ADDR")]
        xds: Option<std::net::SocketAddr>,
    },
    /// Pick endpoints of a query COUNT times through the configured policy (or the one
    /// given), and print each endpoint with how often it was picked and its health.
    Pick {
        /// The service query.
        query: String,
        /// The strategy, over the configured one (round-robin, weighted-round-robin,
        /// random, power-of-two-choices, power-of-two-ewma, pick-first,
        /// consistent-hash).
        #[arg(long, value_name = "S", value_parser = strategy)]
        strategy: Option<wasd::Strategy>,
        /// How many picks.
        #[arg(long, value_name = "N", default_value_t = 100)]
        count: usize,
        /// The request key every pick carries (for consistent-hash).
        #[arg(long, value_name = "K")]
        key: Option<String>,
        /// The caller's zone, over the configured one and WASD_ZONE.
        #[arg(long, value_name = "Z")]
        zone: Option<String>,
        #[command(flatten)]
        filters: FilterArgs,
        #[command(flatten)]
        config: ConfigArgs,
        /// Print one JSON object instead.
        #[arg(long)]
        json: bool,
    },
    /// Load the configuration and every provider module, and explain what is wrong.
    Check {
        #[command(flatten)]
        config: ConfigArgs,
        /// Extra provider modules to check (loaded with no settings and no grants).
        modules: Vec<PathBuf>,
    },
    /// Register a service instance (Kratos style) and keep it registered until
    /// interrupted (SIGINT/SIGTERM), then deregister it.
    Register {
        /// The service name.
        service: String,
        /// An endpoint URL of the instance (`grpc://10.0.0.1:9000`); repeatable.
        #[arg(long = "endpoint", value_name = "URL", required = true)]
        endpoints: Vec<String>,
        /// The instance id. Default: a random UUID.
        #[arg(long)]
        id: Option<String>,
        /// The instance's version.
        #[arg(long, default_value = "")]
        version: String,
        /// Instance metadata; repeatable.
        #[arg(long = "metadata", value_name = "KEY=VALUE", value_parser = key_value)]
        metadata: Vec<(String, String)>,
        /// The lease TTL; the lease is kept alive every third of it.
        #[arg(long, default_value = "15s", value_parser = duration)]
        ttl: Duration,
        #[command(flatten)]
        config: ConfigArgs,
        /// Print one JSON object per state change instead.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        metrics: MetricsArgs,
    },
}

#[derive(Args)]
struct FilterArgs {
    /// Keep only endpoints whose metadata has KEY=VALUE (`version=v2`); repeatable.
    #[arg(long = "filter", value_name = "KEY=VALUE", value_parser = key_value)]
    filters: Vec<(String, String)>,
}

impl FilterArgs {
    fn query(&self, query: &str) -> anyhow::Result<Query> {
        let mut parsed = Query::parse(query)?;
        for (key, value) in &self.filters {
            parsed = parsed.with_filter(key, value);
        }
        Ok(parsed)
    }
}

fn key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("'{text}' is not KEY=VALUE")),
    }
}

fn strategy(text: &str) -> Result<wasd::Strategy, String> {
    text.parse()
}

fn duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("'{text}' is not a duration like \"15s\" ({e})"))
}

#[derive(Args)]
struct MetricsArgs {
    /// Serve Prometheus metrics over HTTP on this address (`127.0.0.1:9464`); any path
    /// answers.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
}

/// Histogram buckets for durations, in seconds: a cached-path provider call takes
/// microseconds, a registry round trip milliseconds, a slow upstream seconds.
const DURATION_BUCKETS: &[f64] = &[
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

impl MetricsArgs {
    /// Install the Prometheus exporter. Before the resolver is built: providers
    /// register their metrics as they load.
    fn serve(&self) -> anyhow::Result<()> {
        let Some(address) = self.metrics else {
            return Ok(());
        };
        let failed =
            |e: metrics_exporter_prometheus::BuildError| anyhow::anyhow!("serving metrics on {address}: {e}");
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(address)
            .set_buckets(DURATION_BUCKETS)
            .map_err(failed)?
            .install()
            .map_err(failed)?;
        wasd::describe_metrics();
        Ok(())
    }
}

#[derive(Args)]
struct ConfigArgs {
    /// The host config file. Default: $WASD_CONFIG, else ./wasd.toml, else built-in
    /// defaults (./appsettings.json and services__* variables, then pass-through).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Load unlisted provider modules from this folder instead of the configured one.
    #[arg(long, value_name = "DIR")]
    plugin_dir: Option<PathBuf>,
}

impl ConfigArgs {
    fn load(&self) -> anyhow::Result<Config> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::discover()?,
        };
        if let Some(dir) = &self.plugin_dir {
            config.set_plugin_dir(Some(dir.clone()));
        }
        Ok(config)
    }

    /// `follow`: watch the config and plugin files and reload on change (for the
    /// long-running commands).
    async fn resolver(&self, follow: bool) -> anyhow::Result<Resolver> {
        let mut builder = Resolver::builder().watch_files(follow);
        // Without --config the builder discovers it ($WASD_CONFIG, ./wasd.toml, or
        // the built-in defaults), again on every reload.
        if let Some(path) = &self.config {
            builder = builder.config_file(path);
        }
        if let Some(dir) = &self.plugin_dir {
            builder = builder.plugin_dir(Some(dir.clone()));
        }
        Ok(builder.build().await?)
    }
}

/// Shows a spinner with the elapsed time on stderr while a provider compiles: the
/// sandbox's `compile` span ([`wasd::COMPILE_TARGET`]) from its start to its end.
#[derive(Default)]
struct CompileProgress {
    spinners: std::sync::Mutex<std::collections::HashMap<tracing::span::Id, indicatif::ProgressBar>>,
}

/// The fields of a `compile` span.
#[derive(Default)]
struct CompileFields {
    provider: String,
    megabytes: f64,
    note: String,
}

impl tracing::field::Visit for CompileFields {
    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        if field.name() == "megabytes" {
            self.megabytes = value;
        }
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        match field.name() {
            "provider" => self.provider = value.to_owned(),
            "note" => self.note = value.to_owned(),
            _ => {}
        }
    }

    fn record_debug(&mut self, _field: &tracing::field::Field, _value: &dyn std::fmt::Debug) {}
}

impl<S: tracing::Subscriber> Layer<S> for CompileProgress {
    fn on_new_span(
        &self,
        attributes: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut fields = CompileFields::default();
        attributes.record(&mut fields);
        let spinner = indicatif::ProgressBar::new_spinner().with_message(format!(
            "compiling provider '{}' ({:.1} MB, {})",
            fields.provider.escape_default(),
            fields.megabytes,
            fields.note
        ));
        if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} {msg} {elapsed}") {
            spinner.set_style(style);
        }
        spinner.enable_steady_tick(Duration::from_millis(100));
        spinner.tick();
        self.spinners
            .lock()
            .expect("spinner lock")
            .insert(id.clone(), spinner);
    }

    fn on_close(&self, id: tracing::span::Id, _: tracing_subscriber::layer::Context<'_, S>) {
        if let Some(spinner) = self.spinners.lock().expect("spinner lock").remove(&id) {
            spinner.finish_and_clear();
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    // At the default level only wasd's own warnings show: a dependency's (a connect
    // error logged by wasmtime-wasi-http) would precede, and repeat, the one line that
    // names the culprit. WASD_LOG takes the usual directives (`debug`, `wasd_core=trace`).
    // wasmtime-wasi logs every byte a guest writes at debug level: a chatty provider
    // would flood the log with its own text, so that stays off unless asked for by name.
    let filter = match std::env::var("WASD_LOG") {
        Ok(directives) if directives.contains("write_stream") => directives,
        Ok(directives) => format!("{directives},wasmtime_wasi::p2::write_stream=off"),
        Err(_) => "off,wasd=warn,wasd_core=warn,wasd_sandbox=warn".to_owned(),
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("off,wasd=warn,wasd_core=warn,wasd_sandbox=warn")
    });
    // With logging asked for, each span's end is a line with its time (a resolve, each
    // provider call in it, each DNS lookup or HTTP request in those), so a slow answer
    // shows where the time went.
    let spans = if std::env::var_os("WASD_LOG").is_some() {
        FmtSpan::CLOSE
    } else {
        FmtSpan::NONE
    };
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_span_events(spans);
    type Logs = Box<dyn Layer<tracing_subscriber::Registry> + Send + Sync>;
    let logs: Logs = match std::env::var("WASD_LOG_FORMAT").as_deref() {
        Err(_) | Ok("text") => Box::new(logs.with_ansi(terminal).with_filter(filter)),
        // One JSON object per line, with the chain of spans it happened in.
        Ok("json") => Box::new(logs.json().with_span_list(true).with_filter(filter)),
        Ok(other) => {
            eprintln!(
                "wasd: WASD_LOG_FORMAT is '{}'; it takes `text` (the default) or `json`",
                other.escape_default()
            );
            return ExitCode::FAILURE;
        }
    };
    // A spinner while a provider compiles (a Python or JavaScript one takes seconds on
    // its first run), on a terminal only.
    let progress = terminal.then(|| {
        CompileProgress::default().with_filter(tracing_subscriber::filter::filter_fn(|meta| {
            meta.target() == wasd::COMPILE_TARGET && meta.is_span()
        }))
    });
    tracing_subscriber::registry().with(logs).with(progress).init();
    match run(Cli::parse()).await {
        Ok(code) => code,
        Err(e) => {
            // One line, whatever the error carries (wasm backtraces span several). The
            // library's errors already name their cause in their message; `{e}` keeps
            // it once.
            let message = format!("{e}");
            eprintln!(
                "wasd: {}",
                message.split_whitespace().collect::<Vec<_>>().join(" ")
            );
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Resolve {
            query,
            filters,
            config,
            json,
            explain,
        } => {
            let parsed = filters.query(&query)?;
            let resolver = config.resolver(false).await?;
            if explain {
                let explanation = resolver.explain_query(&parsed).await;
                // How a balancer would pick among the answer (`[[policy]]`).
                let policy = resolver.policies().for_query(&parsed);
                let mut out = std::io::stdout().lock();
                if json {
                    let mut value = wasd::json::explanation(&explanation);
                    if let Some(fields) = value.as_object_mut() {
                        fields.insert("policy".into(), wasd::json::policy(&policy));
                    }
                    writeln!(out, "{value}")?;
                } else {
                    writeln!(out, "{explanation}")?;
                    writeln!(out, "policy     {policy}")?;
                }
                out.flush()?;
                // Explained, then said once more as the error it is.
                explanation.result?;
                return Ok(ExitCode::SUCCESS);
            }
            let set = resolver.resolve_query(&parsed).await?;
            let mut out = std::io::stdout().lock();
            if json {
                writeln!(out, "{}", wasd::json::set(&parsed, &set))?;
            } else {
                for endpoint in &set {
                    writeln!(out, "{endpoint}")?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Watch {
            query,
            filters,
            config,
            json,
            metrics,
        } => {
            let parsed = filters.query(&query)?;
            metrics.serve()?;
            let resolver = config.resolver(true).await?;
            let mut watch = resolver.watch_query(&parsed).await?;
            let print = |set: &EndpointSet| -> anyhow::Result<()> {
                let mut out = std::io::stdout().lock();
                if json {
                    writeln!(out, "{}", wasd::json::set(&parsed, set))?;
                } else if set.is_empty() {
                    writeln!(out, "(no endpoints)")?;
                } else {
                    let line: Vec<String> = set.iter().map(ToString::to_string).collect();
                    writeln!(out, "{}", line.join(" "))?;
                }
                out.flush()?;
                Ok(())
            };
            print(&watch.current())?;
            print_until_signal(shutdown_signal(), async || watch.changed().await, print).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve {
            config,
            http,
            dns,
            dns_zone,
            xds,
        } => serve(config, http, dns, dns_zone, xds).await,
        Command::Pick {
            query,
            strategy,
            count,
            key,
            zone,
            filters,
            config,
            json,
        } => {
            let parsed = filters.query(&query)?;
            let resolver = config.resolver(false).await?;
            let mut builder = resolver.balancer_for_query(&parsed);
            if let Some(strategy) = strategy {
                builder = builder.strategy(strategy);
            }
            if let Some(zone) = zone {
                builder = builder.zone(zone);
            }
            let balancer = builder.build().await?;
            // Active checks answer once before the picks, so that they show.
            if let Some(check) = balancer.policy().health {
                balancer.checked(check.timeout + Duration::from_secs(1)).await;
            }
            let mut counts = std::collections::HashMap::new();
            for _ in 0..count {
                let picked = match &key {
                    Some(key) => balancer.pick_key(key),
                    None => balancer.pick(),
                };
                *counts.entry(picked.endpoint().clone()).or_insert(0usize) += 1;
            }
            let picks: Vec<_> = balancer
                .health()
                .into_iter()
                .map(|(endpoint, health)| {
                    let count = counts.get(&endpoint).copied().unwrap_or(0);
                    (endpoint, count, health)
                })
                .collect();
            let mut out = std::io::stdout().lock();
            if json {
                writeln!(out, "{}", wasd::json::picks(&parsed, balancer.strategy(), &picks))?;
            } else {
                let width = picks
                    .iter()
                    .map(|(e, _, _)| e.to_string().len())
                    .max()
                    .unwrap_or(0);
                for (endpoint, count, health) in &picks {
                    writeln!(out, "{:<width$}  {count:>6}  {health}", endpoint.to_string())?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { config, modules } => {
            let loaded = config.load()?;
            let reports = wasd::check(&loaded, &modules).await?;
            let mut out = std::io::stdout().lock();
            if let Some(path) = loaded.path() {
                writeln!(out, "ok     host config {}", path.display())?;
            } else {
                writeln!(out, "ok     host config (built-in defaults)")?;
            }
            let mut failed = false;
            for report in &reports {
                if report.problems.is_empty() {
                    writeln!(out, "ok     {} ({})", report.provider, report.source)?;
                }
                for problem in &report.problems {
                    failed = true;
                    let problem = problem.split_whitespace().collect::<Vec<_>>().join(" ");
                    writeln!(out, "error  {} ({}): {problem}", report.provider, report.source)?;
                }
                for note in &report.notes {
                    writeln!(out, "note   {}: {note}", report.provider)?;
                }
            }
            Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Register {
            service,
            endpoints,
            id,
            version,
            metadata,
            ttl,
            config,
            json,
            metrics,
        } => {
            metrics.serve()?;
            let mut instance = ServiceInstance::new(service, endpoints);
            if let Some(id) = id {
                instance.id = id;
            }
            instance.version = version;
            instance.metadata = metadata.into_iter().collect();
            register(instance, ttl, config, json).await
        }
    }
}

async fn serve(
    config: ConfigArgs,
    http: Option<std::net::SocketAddr>,
    dns: Option<std::net::SocketAddr>,
    dns_zone: Option<String>,
    xds: Option<std::net::SocketAddr>,
) -> anyhow::Result<ExitCode> {
    use wasd::serve::{ServeOptions, Server};
    // Before anything is bound or loaded: a signal from then on stops the server.
    let shutdown = shutdown_signal();
    let settings = config.load()?.serve().clone();
    let mut options = ServeOptions::default();
    if let Some(address) = http.or(settings.http) {
        options = options.with_http(address);
    }
    if let Some(address) = dns.or(settings.dns) {
        options = options.with_dns(address);
    }
    if let Some(zone) = dns_zone.or(settings.dns_zone) {
        options = options.with_zone(zone);
    }
    if let Some(ttl) = settings.dns_ttl {
        options = options.with_dns_ttl(ttl);
    }
    if let Some(address) = xds.or(settings.xds) {
        options = options.with_xds(address);
    }
    options = options.with_xds_services(settings.xds_services.clone());
    if let Some(variable) = &settings.token_env {
        match std::env::var(variable) {
            Ok(token) if !token.is_empty() => options = options.with_token(token),
            _ => anyhow::bail!("[serve] token-env names {variable}, which is not set (or empty)"),
        }
    }
    options.check()?;
    // Prometheus metrics for GET /metrics, installed before the providers load.
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(DURATION_BUCKETS)
        .map_err(|e| anyhow::anyhow!("metrics: {e}"))?
        .install_recorder()
        .map_err(|e| anyhow::anyhow!("metrics: {e}"))?;
    wasd::describe_metrics();
    let upkeep = metrics.clone();
    tokio::spawn(async move {
        // Histograms are drained into their summaries here rather than on a scrape.
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    let resolver = config.resolver(true).await?;
    let server = Server::bind(resolver, options.clone(), Some(metrics)).await?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "serving HTTP on http://{}", server.http_addr())?;
        writeln!(
            out,
            "serving DNS on {} (UDP and TCP) for {}",
            server.dns_addr(),
            options.zone
        )?;
        if let Some(address) = server.xds_addr() {
            writeln!(out, "serving xDS on {address}")?;
        }
        out.flush()?;
    }
    server.run_until(shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

async fn register(
    instance: ServiceInstance,
    ttl: Duration,
    config: ConfigArgs,
    json: bool,
) -> anyhow::Result<ExitCode> {
    // Before registering: a SIGTERM from then on deregisters.
    let shutdown = shutdown_signal();
    let resolver = config.resolver(true).await?;
    let mut registration = resolver.register_with_ttl(instance, ttl).await?;
    let instance = registration.instance().clone();
    let print = |state: &RegistrationState| -> anyhow::Result<()> {
        let mut out = std::io::stdout().lock();
        if let RegistrationState::Registering = state {
            return Ok(());
        }
        let (event, detail) = wasd::json::registration_state(state);
        if json {
            let mut line = json!({ "event": event, "service": instance.name, "id": instance.id });
            if let Some(line) = line.as_object_mut() {
                line.extend(detail);
            }
            writeln!(out, "{line}")?;
        } else {
            match state {
                RegistrationState::Registered { lease } => writeln!(
                    out,
                    "registered {instance} (lease {lease}, ttl {})",
                    humantime::format_duration(ttl)
                )?,
                RegistrationState::Retrying { error, retry_in, .. } => writeln!(
                    out,
                    "retrying {instance} in {}: {error}",
                    humantime::format_duration(Duration::from_millis(retry_in.as_millis() as u64))
                )?,
                _ => writeln!(out, "{event} {instance}")?,
            }
        }
        out.flush()?;
        Ok(())
    };
    print_until_signal(shutdown, async || registration.changed().await, print).await?;
    registration.deregister().await?;
    print(&RegistrationState::Stopped)?;
    Ok(ExitCode::SUCCESS)
}

/// Print what `next` yields until it ends or `shutdown` resolves. `shutdown` is made
/// once, before the loop, so a signal that arrives while printing is not lost.
async fn print_until_signal<T>(
    shutdown: impl Future<Output = ()>,
    mut next: impl AsyncFnMut() -> Option<T>,
    print: impl Fn(&T) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            item = next() => match item {
                Some(item) => print(&item)?,
                None => return Ok(()),
            },
            _ = &mut shutdown => return Ok(()),
        }
    }
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is called,
/// not when first polled, so a signal that comes early is not lost.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut int = signal(SignalKind::interrupt()).expect("installing the SIGINT handler");
        let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
        async move {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
