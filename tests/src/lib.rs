//! Support for the integration tests: fixture paths, temporary config folders, the
//! `wasd` binary, and real servers on loopback: dnsmasq, etcd, and the HTTP and gRPC
//! instances the client integrations call.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use tempfile::TempDir;

pub mod conformance;
mod dns;
mod etcd;
pub mod servers;
pub use dns::DnsServer;
pub use etcd::{EtcdServer, TlsFiles};

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

/// Run a command to completion.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("running wasd");
    Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
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
