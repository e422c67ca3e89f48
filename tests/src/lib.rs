//! Support for the integration tests: fixture paths, temporary config folders, the
//! `wasd` binary, and real servers on loopback: dnsmasq, etcd, ZooKeeper, and the HTTP
//! and gRPC instances the client integrations call.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use tempfile::TempDir;

pub mod conformance;
mod dns;
mod etcd;
pub mod peers;
pub mod servers;
mod zookeeper;
pub use dns::DnsServer;
pub use etcd::{EtcdClient, EtcdCluster, EtcdServer, TlsFiles, direct_discovery};
pub use zookeeper::{ZkClient, ZooKeeperEnsemble, ZooKeeperServer};

/// A TCP port free on 127.0.0.1 now, for a server a test starts.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a port");
    listener.local_addr().unwrap().port()
}

/// Paths of the test fixture components, built from `guests/` by the build script.
pub mod fixtures {
    include!(concat!(env!("OUT_DIR"), "/fixtures.rs"));
}

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A two-worker tokio runtime, for benchmarks that drive async code from criterion.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The Python of the venv with the Python clients the tests use (prometheus_client,
/// dnspython, Playwright), installed by `scripts/python-clients` on first use.
pub fn python_clients() -> String {
    let out = run_within(
        &mut Command::new(workspace_root().join("scripts/python-clients")),
        std::time::Duration::from_secs(600),
    );
    assert_eq!(out.code, 0, "scripts/python-clients: {}", out.stderr);
    out.stdout.trim().to_owned()
}

/// Precompiled components shared by all tests (writes are atomic, so concurrent test
/// processes can share it).
pub fn cache_dir() -> PathBuf {
    workspace_root().join("target/wasd-test-cache")
}

/// The `wasd` binary, built (or found up to date) once per test process, so CLI tests
/// never run a stale binary.
pub fn wasd_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| build_wasd(false))
}

/// Build the `wasd` binary (debug, or release for benchmarks) and return its path.
pub fn build_wasd(release: bool) -> PathBuf {
    let root = workspace_root();
    let mut cargo = Command::new(env!("CARGO"));
    cargo.args(["build", "--quiet", "-p", "wasd", "--bin", "wasd"]);
    if release {
        cargo.arg("--release");
    }
    let status = cargo
        .arg("--manifest-path")
        .arg(root.join("Cargo.toml"))
        .status()
        .expect("running cargo build for the wasd binary");
    assert!(status.success(), "building the wasd binary failed");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    target
        .join(if release { "release" } else { "debug" })
        .join(format!("wasd{}", std::env::consts::EXE_SUFFIX))
}

/// A temporary folder to hold a test's config files.
pub struct Sandbox {
    dir: TempDir,
}

impl Default for Sandbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Sandbox {
    /// An empty folder.
    pub fn new() -> Sandbox {
        Sandbox {
            dir: tempfile::tempdir().expect("creating a temp dir"),
        }
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Write a file (parents created) and return its path.
    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.dir.path().join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&path, contents).unwrap();
        path
    }

    /// Write `wasd.toml` and build a resolver from it.
    pub async fn resolver(&self, toml: &str) -> Result<wasd::Resolver, wasd::Error> {
        self.resolver_with_env(toml, &[]).await
    }

    /// The same, giving providers exactly these environment variables (never the test
    /// process's: changing that while threads run is undefined behaviour).
    pub async fn resolver_with_env(
        &self,
        toml: &str,
        env: &[(&str, &str)],
    ) -> Result<wasd::Resolver, wasd::Error> {
        let config = self.write("wasd.toml", toml);
        wasd::Resolver::builder()
            .config_file(config)
            .cache_dir(Some(cache_dir()))
            .environment(env.iter().copied())
            .build()
            .await
    }

    /// Write `appsettings.json` with `Services.{service}.{section}` = `urls`, whole at
    /// once (write, then rename), so a watching provider never reads half of it.
    pub fn write_services(&self, service: &str, section: &str, urls: &[impl AsRef<str>]) {
        let urls: Vec<&str> = urls.iter().map(AsRef::as_ref).collect();
        let json = serde_json::json!({ "Services": { service: { section: urls } } });
        let tmp = self.write("appsettings.json.tmp", json.to_string());
        std::fs::rename(tmp, self.path().join("appsettings.json")).unwrap();
    }

    /// A resolver whose one provider is `config`, reading this folder's
    /// `appsettings.json` (see [`Sandbox::write_services`]); no pass-through, answers
    /// refreshed every second.
    pub async fn config_resolver(&self) -> wasd::Resolver {
        let toml = format!(
            "pass-through = false\nrefresh-period = \"1s\"\n[[provider]]\nbuiltin = \"config\"\n\
             grants = {{ files = [\"{}\"] }}\n",
            self.path().join("appsettings.json").display()
        );
        self.resolver(&toml).await.unwrap()
    }

    /// The `wasd` CLI run in this folder, with a clean environment: no `services__*`
    /// or `WASD_*` variables leak in from the test runner.
    pub fn wasd(&self) -> Command {
        let mut cmd = Command::new(wasd_bin());
        cmd.current_dir(self.path()).env_clear();
        for keep in ["PATH", "HOME"] {
            if let Some(value) = std::env::var_os(keep) {
                cmd.env(keep, value);
            }
        }
        cmd.env("XDG_CACHE_HOME", cache_dir());
        cmd
    }
}

/// Register `instance` for `ttl` with the resolver's registrar and wait (at most 10 s)
/// until the registry has it.
pub async fn register(
    resolver: &wasd::Resolver,
    instance: wasd::ServiceInstance,
    ttl: std::time::Duration,
) -> wasd::Registration {
    let mut registration = resolver.register_with_ttl(instance, ttl).await.unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(10), registration.registered())
        .await
        .expect("registered within 10 s")
        .unwrap();
    registration
}

/// The endpoints of a set as strings, in order.
pub fn strings(set: &wasd::EndpointSet) -> Vec<String> {
    set.iter().map(ToString::to_string).collect()
}

/// The output of a finished CLI run.
pub struct Output {
    /// Exit code.
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// How long a `wasd` command may run before the test kills it and fails: generous, a
/// first compile of a Python or JavaScript component takes ~10 s on a slow machine.
pub const RUN_DEADLINE: std::time::Duration = std::time::Duration::from_secs(120);

/// Run a command to completion, within [`RUN_DEADLINE`].
pub fn run(cmd: &mut Command) -> Output {
    run_within(cmd, RUN_DEADLINE)
}

/// Run a command to completion; past `within` it is killed and the test fails (a hung
/// child must not hang the suite).
pub fn run_within(cmd: &mut Command, within: std::time::Duration) -> Output {
    use std::process::Stdio;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running wasd");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(within) {
        Ok(out) => {
            let out = out.expect("waiting for wasd");
            Output {
                code: out.status.code().unwrap_or(-1),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            }
        }
        Err(_) => {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            panic!("{cmd:?} did not finish within {within:?}");
        }
    }
}

/// A child's output read line by line on a thread, each line awaited under a deadline,
/// so a child that hangs fails the test instead of hanging it.
pub struct Lines {
    lines: std::sync::mpsc::Receiver<String>,
}

impl Lines {
    /// Read `output` (a child's stdout or stderr) from now on.
    pub fn new(output: impl std::io::Read + Send + 'static) -> Lines {
        use std::io::BufRead;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(output).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Lines { lines }
    }

    /// The next line (without its newline); fails the test naming `what` if none
    /// comes within `within` or the output ends.
    pub fn next(&self, within: std::time::Duration, what: &str) -> String {
        self.lines
            .recv_timeout(within)
            .unwrap_or_else(|e| panic!("waiting {within:?} for {what}: {e}"))
    }

    /// Every line until the output ends, which must happen within `within`.
    pub fn rest(&self, within: std::time::Duration) -> Vec<String> {
        let deadline = std::time::Instant::now() + within;
        let mut rest = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => rest.push(line),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return rest,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    panic!("the output did not end within {within:?}; so far {rest:?}")
                }
            }
        }
    }
}

/// Poll `done` every 100 ms until it holds; fail with `what` after `within`.
pub async fn eventually(within: std::time::Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// An example provider from `examples/providers/` (`rust`, `python` or `javascript`),
/// built by `scripts/build-example-providers` (which installs componentize-py and jco
/// locally on first use and rebuilds only what changed).
pub fn example_provider(language: &str) -> PathBuf {
    let root = workspace_root();
    let out = Command::new(root.join("scripts/build-example-providers"))
        .arg(language)
        .output()
        .expect("running scripts/build-example-providers");
    assert!(
        out.status.success(),
        "building the {language} example provider failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    root.join(format!("target/example-providers/{language}.wasm"))
}

/// Wait (10 s at most) until `watch` publishes a set in which an endpoint's `version`
/// metadata is `version`: a put's notification, for benchmarks.
pub async fn until_version(watch: &mut wasd::Watch, version: &str) {
    loop {
        let set = tokio::time::timeout(std::time::Duration::from_secs(10), watch.changed())
            .await
            .expect("no notification within 10 s")
            .expect("the resolver is alive");
        if set.iter().any(|e| e.metadata_value("version") == Some(version)) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[should_panic(expected = "did not finish within")]
    fn a_hung_child_fails_the_test_instead_of_hanging_it() {
        run_within(
            Command::new("sleep").arg("30"),
            std::time::Duration::from_millis(200),
        );
    }

    #[test]
    #[should_panic(expected = "waiting 200ms for a line")]
    fn a_line_that_never_comes_fails_the_test() {
        let mut child = Command::new("sleep")
            .arg("30")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let lines = Lines::new(child.stdout.take().unwrap());
        let _kill = KillOnDrop(child);
        lines.next(std::time::Duration::from_millis(200), "a line");
    }

    struct KillOnDrop(std::process::Child);

    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
