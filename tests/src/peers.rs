//! Peers in other languages the tests drive as users' programs would: gRPC servers
//! and an xDS client in Python (grpcio, `tests/clients/xds_grpc.py`).

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{Lines, Sandbox, workspace_root};

/// A child killed when dropped, so a failing assertion leaves no process behind.
pub struct Reaped(pub Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// gRPC servers (Python grpcio) on free ports, each answering with its name (`s0`...).
pub struct GrpcServers {
    _child: Reaped,
    pub ports: Vec<u16>,
}

impl GrpcServers {
    pub fn start(python: &str, count: usize) -> GrpcServers {
        let mut child = Reaped(
            Command::new(python)
                .arg(workspace_root().join("tests/clients/xds_grpc.py"))
                .args(["servers", &count.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("starting the gRPC servers"),
        );
        let said = Lines::new(child.0.stdout.take().unwrap());
        let line = said.next(Duration::from_secs(60), "the gRPC servers' ports");
        let ports = line
            .strip_prefix("ports ")
            .unwrap_or_else(|| panic!("{line}"))
            .split_whitespace()
            .map(|p| p.parse().unwrap())
            .collect();
        GrpcServers { _child: child, ports }
    }

    pub fn url(&self, i: usize) -> String {
        format!("grpc://127.0.0.1:{}", self.ports[i])
    }
}

/// A Python grpcio client whose channels resolve `xds:///NAME` through `wasd serve
/// --xds` (its bootstrap file names the server).
pub struct XdsClient {
    child: Reaped,
    said: Lines,
}

/// What a batch of calls did: calls answered per server name, failures per code.
#[derive(Debug, Default, PartialEq)]
pub struct Calls {
    pub ok: std::collections::BTreeMap<String, u64>,
    pub errors: std::collections::BTreeMap<String, u64>,
}

impl XdsClient {
    pub fn start(python: &str, sandbox: &Sandbox, xds: &str) -> XdsClient {
        let bootstrap = sandbox.write(
            "xds-bootstrap.json",
            format!(
                r#"{{"xds_servers": [{{"server_uri": "{xds}", "channel_creds": [{{"type": "insecure"}}], "server_features": ["xds_v3"]}}],
  "node": {{"id": "wasd-test-client", "locality": {{}}}}}}"#
            ),
        );
        let mut child = Reaped(
            Command::new(python)
                .arg(workspace_root().join("tests/clients/xds_grpc.py"))
                .arg("client")
                .env("GRPC_XDS_BOOTSTRAP", bootstrap)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("starting the xDS client"),
        );
        let said = Lines::new(child.0.stdout.take().unwrap());
        XdsClient { child, said }
    }

    /// `count` calls on the channel to `xds:///target`.
    pub fn call(&mut self, target: &str, count: usize) -> Calls {
        writeln!(self.child.0.stdin.as_mut().unwrap(), "call {target} {count}").unwrap();
        let line = self
            .said
            .next(Duration::from_secs(30 + 3 * count as u64), "the client's calls");
        let answer: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        let counts = |v: &Value| {
            v.as_object()
                .unwrap()
                .iter()
                .map(|(k, n)| (k.clone(), n.as_u64().unwrap()))
                .collect()
        };
        Calls {
            ok: counts(&answer["ok"]),
            errors: counts(&answer["errors"]),
        }
    }

    /// Call in batches of `batch` until `done` holds; fail after `within`. The calls
    /// are the observation: each batch is what the client's channel does now.
    pub fn call_until(
        &mut self,
        target: &str,
        batch: usize,
        within: Duration,
        what: &str,
        done: impl Fn(&Calls) -> bool,
    ) -> (Calls, Duration) {
        let began = Instant::now();
        loop {
            let calls = self.call(target, batch);
            if done(&calls) {
                return (calls, began.elapsed());
            }
            assert!(
                began.elapsed() < within,
                "waited {within:?} for {what}; the last calls: {calls:?}"
            );
        }
    }
}

impl XdsClient {
    /// What the client's xDS client holds, as its CSDS service (grpcio-csds) reports
    /// it: `[type, name, status, version]` each (`["Listener", "echo", "ACKED", "1"]`).
    pub fn resources(&mut self) -> Vec<[String; 4]> {
        writeln!(self.child.0.stdin.as_mut().unwrap(), "csds - -").unwrap();
        let line = self
            .said
            .next(Duration::from_secs(30), "the client's CSDS report");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    }

    /// Call `xds:///target` until a call is answered by the server named `name`; the
    /// number of calls it took (`None`: not within 100 000 calls).
    pub fn until(&mut self, target: &str, name: &str) -> Option<u64> {
        writeln!(self.child.0.stdin.as_mut().unwrap(), "until {target} {name}").unwrap();
        let line = self.said.next(Duration::from_secs(600), "the client's answer");
        line.strip_prefix("answered ").map(|n| n.parse().unwrap())
    }
}
