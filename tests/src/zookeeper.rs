//! A real ZooKeeper for tests: Debian's `zookeeper` 3.8 (the server class of its jar,
//! on Java 17) on 127.0.0.1, a free port and a temporary data folder, stopped on drop;
//! and kazoo, a Python ZooKeeper client nobody here wrote, to write and read znodes as
//! other services would.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tempfile::TempDir;

use crate::{Lines, free_port};

/// Debian's ZooKeeper jar, which names its dependencies in its manifest.
const ZOOKEEPER_JAR: &str = "/usr/share/java/zookeeper.jar";

/// A running ZooKeeper: standalone, or one member of a [`ZooKeeperEnsemble`].
pub struct ZooKeeperServer {
    child: Option<Child>,
    dir: TempDir,
    port: u16,
    /// In an ensemble: this member's id and the `server.N=` lines of all members.
    quorum: Option<(usize, String)>,
}

impl ZooKeeperServer {
    /// Start one, with sessions of 1 s to 60 s allowed (tick 500 ms), so tests can
    /// expire a session in a couple of seconds.
    pub fn start() -> ZooKeeperServer {
        let mut server = ZooKeeperServer::new(None);
        server.spawn();
        server
    }

    fn new(quorum: Option<(usize, String)>) -> ZooKeeperServer {
        ZooKeeperServer {
            child: None,
            dir: tempfile::tempdir().unwrap(),
            port: free_port(),
            quorum,
        }
    }

    /// `127.0.0.1:PORT`, for the provider's `servers` and `grants.tcp`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        self.launch();
        self.wait_serving();
    }

    /// Start the process, not waiting for it (an ensemble's members wait for each
    /// other to elect a leader).
    fn launch(&mut self) {
        let data = self.dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let config = self.dir.path().join("zoo.cfg");
        let mut text = format!(
            "tickTime=500\ninitLimit=10\nsyncLimit=5\ndataDir={}\nclientPort={}\n\
             clientPortAddress=127.0.0.1\nminSessionTimeout=1000\nmaxSessionTimeout=60000\n\
             admin.enableServer=false\n4lw.commands.whitelist=srvr\n",
            data.display(),
            self.port
        );
        let main = match &self.quorum {
            None => "org.apache.zookeeper.server.ZooKeeperServerMain",
            Some((id, servers)) => {
                text.push_str(servers);
                std::fs::write(data.join("myid"), format!("{id}\n")).unwrap();
                "org.apache.zookeeper.server.quorum.QuorumPeerMain"
            }
        };
        std::fs::write(&config, text).unwrap();
        assert!(
            std::path::Path::new(ZOOKEEPER_JAR).is_file(),
            "{ZOOKEEPER_JAR} is missing (scripts/setup installs Debian's zookeeper)"
        );
        self.child = Some(
            Command::new("java")
                .args(["-Xmx256m", "-cp", ZOOKEEPER_JAR])
                .arg(format!("-Dzookeeper.log.dir={}", self.dir.path().display()))
                .arg(main)
                .arg(&config)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("starting ZooKeeper (scripts/setup installs Debian's zookeeper and Java)"),
        );
    }

    fn wait_serving(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.mode().is_none() {
            assert!(
                Instant::now() < deadline,
                "ZooKeeper at {} did not start serving",
                self.address()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `standalone`, `leader` or `follower` once it serves clients (ZooKeeper's `srvr`
    /// command); none while it is down or without a quorum.
    pub fn mode(&self) -> Option<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
        stream.write_all(b"srvr").ok()?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).ok()?;
        answer
            .lines()
            .find_map(|line| line.strip_prefix("Mode: "))
            .map(str::to_owned)
    }

    /// Kill it (SIGKILL): connections are refused until [`ZooKeeperServer::restart`].
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start again on the same port with the same data (sessions survive).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Start again on the same port with an empty data folder: every znode and session
    /// is gone.
    pub fn restart_empty(&mut self) {
        self.kill();
        std::fs::remove_dir_all(self.dir.path().join("data")).unwrap();
        self.spawn();
    }

    /// A client session (kazoo), optionally authenticated with `user:password`.
    pub fn client(&self, digest: Option<&str>) -> ZkClient {
        ZkClient::start(&[self.address()], digest)
    }
}

impl Drop for ZooKeeperServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A ZooKeeper ensemble on loopback: each member a [`ZooKeeperServer`] with its own
/// client, quorum and election ports.
pub struct ZooKeeperEnsemble {
    pub members: Vec<ZooKeeperServer>,
}

impl ZooKeeperEnsemble {
    /// Start `n` members and wait until each serves (which needs a leader).
    pub fn start(n: usize) -> ZooKeeperEnsemble {
        let servers: String = (1..=n)
            .map(|id| format!("server.{id}=127.0.0.1:{}:{}\n", free_port(), free_port()))
            .collect();
        let mut members: Vec<ZooKeeperServer> = (1..=n)
            .map(|id| ZooKeeperServer::new(Some((id, servers.clone()))))
            .collect();
        for member in &mut members {
            member.launch();
        }
        for member in &members {
            member.wait_serving();
        }
        ZooKeeperEnsemble { members }
    }

    /// Every member's `127.0.0.1:PORT`, in order.
    pub fn addresses(&self) -> Vec<String> {
        self.members.iter().map(ZooKeeperServer::address).collect()
    }

    /// Kill member `i` (SIGKILL).
    pub fn kill(&mut self, i: usize) {
        self.members[i].kill();
    }

    /// Start member `i` again with its data, and wait until it serves.
    pub fn restart(&mut self, i: usize) {
        self.members[i].restart();
    }
}

/// One kazoo session, driven line by line (tests/clients/zk_client.py).
pub struct ZkClient {
    child: Child,
    stdin: ChildStdin,
    lines: Lines,
    /// The session id ZooKeeper gave it.
    pub session: i64,
}

impl ZkClient {
    pub fn start(servers: &[String], digest: Option<&str>) -> ZkClient {
        let script: PathBuf = crate::workspace_root().join("tests/clients/zk_client.py");
        let mut child = Command::new(crate::python_clients())
            .arg(script)
            .arg(servers.join(","))
            .arg(digest.unwrap_or_default())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting the kazoo client");
        let stdin = child.stdin.take().unwrap();
        let lines = Lines::new(child.stdout.take().unwrap());
        let ready: Value =
            serde_json::from_str(&lines.next(Duration::from_secs(30), "kazoo to connect")).unwrap();
        ZkClient {
            session: ready["ready"].as_i64().expect("a session id"),
            child,
            stdin,
            lines,
        }
    }

    /// One command; its result, or the client's error message.
    pub fn call(&mut self, command: Value) -> Result<Value, String> {
        writeln!(self.stdin, "{command}").unwrap();
        let answer: Value = serde_json::from_str(
            &self
                .lines
                .next(Duration::from_secs(20), &format!("kazoo: {command}")),
        )
        .unwrap();
        match answer.get("error") {
            Some(error) => Err(error.as_str().unwrap_or_default().to_owned()),
            None => Ok(answer["ok"].clone()),
        }
    }

    fn ok(&mut self, command: Value) -> Value {
        let what = command.to_string();
        self.call(command).unwrap_or_else(|e| panic!("kazoo {what}: {e}"))
    }

    /// Register an instance as Kratos's Go registry does: persistent parents, then an
    /// ephemeral node (this client's session) holding the instance's JSON.
    pub fn register_kratos(&mut self, service: &str, id: &str, version: &str, endpoints: &[&str]) {
        self.ok(json!(["kratos", service, id, version, endpoints, true]));
    }

    pub fn create(&mut self, path: &str, data: &str, ephemeral: bool) {
        self.ok(json!(["create", path, data, ephemeral]));
    }

    pub fn set(&mut self, path: &str, data: &str) {
        self.ok(json!(["set", path, data]));
    }

    pub fn delete(&mut self, path: &str) {
        self.ok(json!(["delete", path]));
    }

    /// The node's data and owner, none if it does not exist.
    pub fn get(&mut self, path: &str) -> Option<(String, i64)> {
        let found = self.ok(json!(["get", path]));
        (!found.is_null()).then(|| {
            (
                found["data"].as_str().unwrap().to_owned(),
                found["ephemeral_owner"].as_i64().unwrap(),
            )
        })
    }

    /// The children's names (sorted); none if the node does not exist.
    pub fn children(&mut self, path: &str) -> Option<Vec<String>> {
        let found = self.ok(json!(["children", path]));
        (!found.is_null()).then(|| serde_json::from_value(found).unwrap())
    }

    /// The node's ACL as `scheme:id:perms`.
    pub fn acl(&mut self, path: &str) -> Vec<String> {
        serde_json::from_value(self.ok(json!(["acl", path]))).unwrap()
    }

    /// End the session: its ephemeral nodes are deleted now.
    pub fn close(mut self) {
        self.ok(json!(["close"]));
        let _ = self.child.wait();
    }
}

impl Drop for ZkClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
