//! A real etcd for tests: Debian's etcd-server on 127.0.0.1 with free high ports and a
//! temporary data folder, stopped on drop. Keys are written through etcd's own v3
//! gateway (as another Kratos service would), never through wasd.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::free_port;

/// A self-signed CA, a server certificate for 127.0.0.1 and a client certificate
/// (for mutual TLS), made with openssl.
pub struct TlsFiles {
    _dir: TempDir,
    /// The CA certificate (PEM), for the client's `tls.ca-file`.
    pub ca: PathBuf,
    /// The server certificate and key.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// A client certificate signed by the same CA, and its key.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl TlsFiles {
    pub fn generate() -> TlsFiles {
        TlsFiles::generate_for(&[])
    }

    /// As [`TlsFiles::generate`], the server certificate also valid for `names`.
    pub fn generate_for(names: &[&str]) -> TlsFiles {
        let dir = tempfile::tempdir().unwrap();
        let p = |name: &str| dir.path().join(name);
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .output()
                .expect("running openssl (scripts/setup installs it)");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
        let mut ca = vec!["req", "-x509", "-days", "2", "-subj", "/CN=wasd test CA"];
        ca.extend(ec);
        ca.extend(["-keyout", "ca.key", "-out", "ca.pem"]);
        ca.extend([
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        openssl(&ca);
        let mut csr = vec!["req", "-subj", "/CN=127.0.0.1"];
        csr.extend(ec);
        csr.extend(["-keyout", "server.key", "-out", "server.csr"]);
        openssl(&csr);
        let alt: String = names.iter().map(|n| format!(",DNS:{n}")).collect();
        // Also for client auth: under `--client-cert-auth`, etcd's own HTTP gateway
        // presents the server certificate to etcd's gRPC side.
        std::fs::write(
            p("ext.cnf"),
            format!(
                "subjectAltName=IP:127.0.0.1,DNS:localhost{alt}\nbasicConstraints=CA:FALSE\n\
                 keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n"
            ),
        )
        .unwrap();
        // Sign a request with the CA, with these extensions.
        let sign = |name: &str, extensions: &str| {
            let (csr, pem) = (format!("{name}.csr"), format!("{name}.pem"));
            openssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                &pem,
                "-extfile",
                extensions,
            ]);
        };
        sign("server", "ext.cnf");
        let mut csr = vec!["req", "-subj", "/CN=wasd-test-client"];
        csr.extend(ec);
        csr.extend(["-keyout", "client.key", "-out", "client.csr"]);
        openssl(&csr);
        std::fs::write(
            p("client.cnf"),
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n",
        )
        .unwrap();
        sign("client", "client.cnf");
        TlsFiles {
            ca: p("ca.pem"),
            cert: p("server.pem"),
            key: p("server.key"),
            client_cert: p("client.pem"),
            client_key: p("client.key"),
            _dir: dir,
        }
    }
}

/// A running etcd.
pub struct EtcdServer {
    child: Option<Child>,
    data: TempDir,
    client_port: u16,
    peer_port: u16,
    tls: Option<(PathBuf, PathBuf, PathBuf)>,
    /// Clients must present a certificate signed by the CA (`--client-cert-auth`).
    client_auth: bool,
    flags: Vec<String>,
    agent: ureq::Agent,
    /// Admin credentials once auth is on.
    auth: Mutex<Option<(String, String, String)>>,
}

impl EtcdServer {
    /// Start etcd over plain HTTP.
    pub fn start() -> EtcdServer {
        Self::start_with(None, &[])
    }

    /// Start etcd serving HTTPS with this certificate.
    pub fn start_tls(tls: &TlsFiles) -> EtcdServer {
        Self::start_with(Some(tls), &[])
    }

    /// Start etcd with extra command-line flags (`--auth-token-ttl=1`).
    pub fn start_with(tls: Option<&TlsFiles>, flags: &[&str]) -> EtcdServer {
        Self::start_full(tls, false, flags)
    }

    /// Start etcd serving HTTPS that only talks to clients presenting a certificate
    /// signed by the CA (mutual TLS); this harness presents `tls.client_cert`.
    pub fn start_mutual_tls(tls: &TlsFiles) -> EtcdServer {
        Self::start_full(Some(tls), true, &[])
    }

    fn start_full(tls: Option<&TlsFiles>, client_auth: bool, flags: &[&str]) -> EtcdServer {
        let mut tls_config = ureq::tls::TlsConfig::builder();
        if let Some(tls) = tls {
            let pem = std::fs::read(&tls.ca).unwrap();
            let ca = ureq::tls::Certificate::from_pem(&pem).unwrap().to_owned();
            tls_config = tls_config.root_certs(ureq::tls::RootCerts::Specific(Arc::new(vec![ca])));
            if client_auth {
                let cert = std::fs::read(&tls.client_cert).unwrap();
                let cert = ureq::tls::Certificate::from_pem(&cert).unwrap().to_owned();
                let key = std::fs::read(&tls.client_key).unwrap();
                let key = ureq::tls::PrivateKey::from_pem(&key).unwrap().to_owned();
                tls_config =
                    tls_config.client_cert(Some(ureq::tls::ClientCert::new_with_certs(&[cert], key)));
            }
        }
        let agent = ureq::Agent::new_with_config(
            ureq::config::Config::builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(5)))
                .tls_config(tls_config.build())
                .build(),
        );
        let mut server = EtcdServer {
            child: None,
            data: tempfile::tempdir().unwrap(),
            client_port: free_port(),
            peer_port: free_port(),
            tls: tls.map(|t| (t.ca.clone(), t.cert.clone(), t.key.clone())),
            client_auth,
            flags: flags.iter().map(|f| f.to_string()).collect(),
            agent,
            auth: Mutex::new(None),
        };
        server.spawn();
        server
    }

    /// The client URL (`http://127.0.0.1:PORT`), for the provider's `endpoints` and
    /// `grants.http`.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    fn spawn(&mut self) {
        let url = self.url();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = etcd_command("wasd-test", self.data.path(), &url, &peer);
        cmd.args(["--initial-cluster", &format!("wasd-test={peer}")])
            .args(&self.flags)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some((ca, cert, key)) = &self.tls {
            cmd.arg("--cert-file").arg(cert).arg("--key-file").arg(key);
            if self.client_auth {
                cmd.arg("--client-cert-auth").arg("--trusted-ca-file").arg(ca);
            }
        }
        self.child = Some(
            cmd.spawn()
                .expect("starting etcd (scripts/setup installs Debian's etcd-server)"),
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let healthy = TcpStream::connect(("127.0.0.1", self.client_port)).is_ok()
                && self
                    .agent
                    .get(format!("{url}/health"))
                    .call()
                    .is_ok_and(|r| r.status() == 200);
            if healthy {
                return;
            }
            assert!(Instant::now() < deadline, "etcd did not become healthy at {url}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kill etcd (SIGKILL): requests now fail with connection refused.
    /// A `wasd.toml` whose one provider is the etcd provider on this server, with no
    /// pass-through (an unknown service is unknown).
    pub fn only_provider_config(&self) -> String {
        let url = self.url();
        format!(
            r#"
pass-through = false
[[provider]]
builtin = "etcd"
settings = {{ endpoints = ["{url}"] }}
grants = {{ http = ["{url}"] }}
"#
        )
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start again on the same ports with the same data.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Start again on the same ports with an empty data folder: every key and lease
    /// is gone, as after losing a single-node cluster's disk. Returns the instant the
    /// new process was started: the earliest it can answer (it may answer before it
    /// reports healthy, so a test's "down" window must end here, not on return).
    pub fn restart_empty(&mut self) -> Instant {
        self.kill();
        self.data = tempfile::tempdir().unwrap();
        *self.auth.lock().unwrap() = None;
        let started = Instant::now();
        self.spawn();
        started
    }

    /// POST to the gateway; the JSON answer. Panics on an HTTP error.
    pub fn post(&self, path: &str, body: Value) -> Value {
        let (status, text) = self.post_raw(path, &body);
        assert_eq!(status, 200, "etcd {path}: {text}");
        serde_json::from_str(&text).unwrap()
    }

    fn post_raw(&self, path: &str, body: &Value) -> (u16, String) {
        let (status, text) = self.post_once(path, body);
        // Tokens may expire (tests shorten their TTL): authenticate again once.
        if status == 401 && text.contains("invalid auth token") {
            let credentials = self.auth.lock().unwrap().clone();
            if let Some((user, password, _)) = credentials {
                *self.auth.lock().unwrap() = None;
                let (_, answer) = self.post_once(
                    "/v3/auth/authenticate",
                    &json!({ "name": user, "password": password }),
                );
                let token: Value = serde_json::from_str(&answer).unwrap();
                let token = token["token"].as_str().unwrap().to_owned();
                *self.auth.lock().unwrap() = Some((user, password, token));
                return self.post_once(path, body);
            }
        }
        (status, text)
    }

    fn post_once(&self, path: &str, body: &Value) -> (u16, String) {
        let mut request = self
            .agent
            .post(format!("{}{path}", self.url()))
            .header("content-type", "application/json");
        if let Some((_, _, token)) = &*self.auth.lock().unwrap() {
            request = request.header("authorization", token);
        }
        let mut response = request
            .send(body.to_string())
            .unwrap_or_else(|e| panic!("etcd {path}: {e}"));
        let text = response.body_mut().read_to_string().unwrap_or_default();
        (response.status().as_u16(), text)
    }

    /// Write a key, optionally under a lease.
    pub fn put(&self, key: &str, value: &[u8], lease: Option<&str>) {
        self.post("/v3/kv/put", put_body(key, value, lease));
    }

    /// Write a Kratos ServiceInstance the way Kratos's Go registry does.
    pub fn put_instance(&self, name: &str, id: &str, version: &str, endpoints: &[&str], lease: Option<&str>) {
        let (key, value) = kratos_instance(name, id, version, endpoints);
        self.put(&key, &value, lease);
    }

    pub fn delete(&self, key: &str) {
        self.post("/v3/kv/deleterange", json!({ "key": b64(key.as_bytes()) }));
    }

    /// The values under a prefix, decoded.
    pub fn get_prefix(&self, prefix: &str) -> Vec<(String, String)> {
        decode_kvs(&self.post("/v3/kv/range", prefix_range(prefix)))
    }

    /// A new lease of `ttl` seconds; its id.
    pub fn grant(&self, ttl: u64) -> String {
        self.post("/v3/lease/grant", json!({ "TTL": ttl.to_string() }))["ID"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Create `user` with `password` as root and turn authentication on.
    pub fn enable_auth(&self, user: &str, password: &str) {
        self.post("/v3/auth/user/add", json!({ "name": user, "password": password }));
        let _ = self.post_raw("/v3/auth/role/add", &json!({ "name": "root" }));
        self.post("/v3/auth/user/grant", json!({ "user": user, "role": "root" }));
        self.post("/v3/auth/enable", json!({}));
        let token = self.post(
            "/v3/auth/authenticate",
            json!({ "name": user, "password": password }),
        )["token"]
            .as_str()
            .unwrap()
            .to_owned();
        *self.auth.lock().unwrap() = Some((user.to_owned(), password.to_owned(), token));
    }

    /// Without a token, as a stranger would call.
    pub fn anonymous_status(&self, path: &str, body: Value) -> u16 {
        let response = self
            .agent
            .post(format!("{}{path}", self.url()))
            .header("content-type", "application/json")
            .send(body.to_string())
            .unwrap();
        response.status().as_u16()
    }

    pub fn data_dir(&self) -> &Path {
        self.data.path()
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn b64(bytes: &[u8]) -> String {
    BASE64.encode(bytes)
}

/// `etcd` on loopback: its name, data folder, client and peer URLs, errors only logged.
fn etcd_command(name: &str, data: &Path, url: &str, peer: &str) -> Command {
    let mut cmd = Command::new("etcd");
    cmd.args(["--name", name, "--data-dir"])
        .arg(data)
        .args(["--listen-client-urls", url, "--advertise-client-urls", url])
        .args(["--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer])
        .args(["--logger", "zap", "--log-level", "error"]);
    cmd
}

/// What a native Kratos discovery does per lookup, for benchmarks' baselines: a range
/// read of the service's prefix over the gateway, each value decoded into an
/// instance, its endpoints collected.
pub fn direct_discovery(agent: &ureq::Agent, url: &str, service: &str) -> Vec<String> {
    let answer: Value = {
        let mut response = agent
            .post(format!("{url}/v3/kv/range"))
            .header("content-type", "application/json")
            .send(prefix_range(&format!("/microservices/{service}/")).to_string())
            .unwrap();
        serde_json::from_str(&response.body_mut().read_to_string().unwrap()).unwrap()
    };
    let mut endpoints = Vec::new();
    for kv in answer["kvs"].as_array().into_iter().flatten() {
        let value = BASE64.decode(kv["value"].as_str().unwrap()).unwrap();
        let instance: Value = serde_json::from_slice(&value).unwrap();
        if instance["name"] != service {
            continue;
        }
        for endpoint in instance["endpoints"].as_array().into_iter().flatten() {
            endpoints.push(endpoint.as_str().unwrap().to_owned());
        }
    }
    endpoints
}

fn put_body(key: &str, value: &[u8], lease: Option<&str>) -> Value {
    let mut body = json!({ "key": b64(key.as_bytes()), "value": b64(value) });
    if let Some(lease) = lease {
        body["lease"] = json!(lease);
    }
    body
}

/// The key and value Kratos's Go registry writes for an instance.
fn kratos_instance(name: &str, id: &str, version: &str, endpoints: &[&str]) -> (String, Vec<u8>) {
    let value = json!({
        "id": id, "name": name, "version": version, "metadata": null, "endpoints": endpoints,
    });
    (
        format!("/microservices/{name}/{id}"),
        value.to_string().into_bytes(),
    )
}

/// A range request for every key under `prefix`.
fn prefix_range(prefix: &str) -> Value {
    let mut end = prefix.as_bytes().to_vec();
    *end.last_mut().unwrap() += 1;
    json!({ "key": b64(prefix.as_bytes()), "range_end": b64(&end) })
}

/// A range answer's keys and values, decoded.
fn decode_kvs(answer: &Value) -> Vec<(String, String)> {
    answer["kvs"]
        .as_array()
        .map(|kvs| {
            kvs.iter()
                .map(|kv| (unb64(&kv["key"]), unb64(&kv["value"])))
                .collect()
        })
        .unwrap_or_default()
}

fn unb64(value: &Value) -> String {
    String::from_utf8(BASE64.decode(value.as_str().unwrap_or_default()).unwrap()).unwrap()
}

/// One member of an [`EtcdCluster`].
struct Member {
    name: String,
    child: Option<Child>,
    data: TempDir,
    client_port: u16,
    peer_port: u16,
    frozen: bool,
}

impl Member {
    fn answers(&self) -> bool {
        self.child.is_some() && !self.frozen
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }
}

/// A real etcd cluster on loopback: `n` members of Debian's etcd-server, each with its
/// own ports and data folder, all stopped on drop. Members can be killed (SIGKILL),
/// frozen (SIGSTOP, as behind a partition: the port still accepts connections, nothing
/// answers), thawed and restarted on their data.
pub struct EtcdCluster {
    members: Vec<Member>,
    client: EtcdClient,
}

impl EtcdCluster {
    /// Start `n` members and wait until each reports healthy (which needs a leader).
    pub fn start(n: usize) -> EtcdCluster {
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                child: None,
                data: tempfile::tempdir().unwrap(),
                client_port: free_port(),
                peer_port: free_port(),
                frozen: false,
            })
            .collect();
        let client = EtcdClient::new(members.iter().map(Member::url).collect());
        let mut cluster = EtcdCluster { members, client };
        // All at once: each waits for the others to elect a leader.
        for i in 0..n {
            cluster.spawn(i, "new");
        }
        for i in 0..n {
            cluster.wait_healthy(i);
        }
        cluster
    }

    fn spawn(&mut self, i: usize, state: &str) {
        let initial: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect();
        let member = &mut self.members[i];
        let url = member.url();
        let peer = format!("http://127.0.0.1:{}", member.peer_port);
        let child = etcd_command(&member.name, member.data.path(), &url, &peer)
            .args(["--initial-cluster", &initial.join(",")])
            .args([
                "--initial-cluster-state",
                state,
                "--initial-cluster-token",
                "wasd-test",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting etcd (scripts/setup installs Debian's etcd-server)");
        member.child = Some(child);
    }

    fn wait_healthy(&self, i: usize) {
        let url = self.members[i].url();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self
            .client
            .agent
            .get(format!("{url}/health"))
            .call()
            .is_ok_and(|r| r.status() == 200)
        {
            assert!(
                Instant::now() < deadline,
                "etcd member {i} did not become healthy at {url}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Member `i`'s client URL.
    pub fn url(&self, i: usize) -> String {
        self.members[i].url()
    }

    /// A client of the whole cluster, for writers on other threads.
    pub fn client(&self) -> EtcdClient {
        self.client.clone()
    }

    /// The member that leads now, as the running members say; waits (up to 15 s)
    /// while an election is on.
    pub fn leader(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let mut ids = vec![None; self.members.len()];
            let mut leader = None;
            for (i, member) in self.members.iter().enumerate() {
                if !member.answers() {
                    continue;
                }
                if let Some(status) = self.client.try_post(i, "/v3/maintenance/status", &json!({})) {
                    ids[i] = status["header"]["member_id"].as_str().map(str::to_owned);
                    leader = status["leader"].as_str().filter(|l| *l != "0").map(str::to_owned);
                }
            }
            if let Some(at) = leader.and_then(|l| ids.iter().position(|id| id.as_deref() == Some(&l))) {
                return at;
            }
            assert!(Instant::now() < deadline, "no etcd member leads");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL member `i`.
    pub fn kill(&mut self, i: usize) {
        self.members[i].frozen = false;
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start member `i` again on its data and ports; returns once it is healthy.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i, "existing");
        self.wait_healthy(i);
    }

    /// Freeze member `i` (SIGSTOP): connections to it are accepted by the kernel and
    /// never answered, as behind a partition.
    pub fn freeze(&mut self, i: usize) {
        self.signal(i, "-STOP");
        self.members[i].frozen = true;
    }

    /// Thaw a frozen member (SIGCONT).
    pub fn thaw(&mut self, i: usize) {
        self.signal(i, "-CONT");
        self.members[i].frozen = false;
    }

    /// The answering member with a watch stream open (gRPC watch streams started and
    /// not yet handled, the gateway's included), waiting up to 10 s for one.
    pub fn watch_holder(&self) -> usize {
        let watch = "grpc_service=\"etcdserverpb.Watch\"";
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let holder = (0..self.members.len())
                .filter(|&i| self.members[i].answers())
                .find(|&i| {
                    self.metric(i, "grpc_server_started_total", watch)
                        > self.metric(i, "grpc_server_handled_total", watch)
                });
            if let Some(holder) = holder {
                return holder;
            }
            assert!(Instant::now() < deadline, "no member has a watch open");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, i: usize, signal: &str) {
        let pid = self.members[i].child.as_ref().expect("a running member").id();
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// How many gRPC `method` calls (`Range`, `Watch`, `LeaseKeepAlive`) member `i`
    /// has handled, from its own Prometheus metrics (the gateway's requests included).
    pub fn served(&self, i: usize, method: &str) -> u64 {
        self.metric(
            i,
            "grpc_server_handled_total",
            &format!("grpc_method=\"{method}\""),
        )
    }

    /// The sum of member `i`'s samples of `name` whose labels contain `label`.
    fn metric(&self, i: usize, name: &str, label: &str) -> u64 {
        let mut response = self
            .client
            .agent
            .get(format!("{}/metrics", self.url(i)))
            .call()
            .unwrap();
        let text = response.body_mut().read_to_string().unwrap();
        text.lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with([' ', '{']) && rest.contains(label))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }

    /// A `wasd.toml` whose one provider is the etcd provider given `endpoints` (this
    /// cluster's URLs, in the order the provider should try them), set up for a
    /// cluster as README shows: requests go on through an election for 3 s, within a
    /// 5 s limit.
    pub fn config(&self, endpoints: &[String], settings: &str) -> String {
        let list = endpoints
            .iter()
            .map(|u| format!("\"{u}\""))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            r#"
pass-through = false
[[provider]]
builtin = "etcd"
settings = {{ endpoints = [{list}], retry-for = "3s" {settings} }}
grants = {{ http = [{list}] }}
limits = {{ timeout = "5s" }}
"#
        )
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            // SIGKILL ends a frozen process too.
            self.kill(i);
        }
    }
}

/// A client of an [`EtcdCluster`] through etcd's own gateway, as a Go service given
/// every endpoint would be: each request goes to the member that answered last, then
/// the others, again through an election, for up to 15 s.
#[derive(Clone)]
pub struct EtcdClient {
    urls: Vec<String>,
    agent: ureq::Agent,
    last: Arc<AtomicUsize>,
}

impl EtcdClient {
    fn new(urls: Vec<String>) -> EtcdClient {
        let agent = ureq::Agent::new_with_config(
            ureq::config::Config::builder()
                .http_status_as_error(false)
                // A frozen member costs this much per request.
                .timeout_global(Some(Duration::from_secs(1)))
                .build(),
        );
        EtcdClient {
            urls,
            agent,
            last: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn try_post(&self, i: usize, path: &str, body: &Value) -> Option<Value> {
        let mut response = self
            .agent
            .post(format!("{}{path}", self.urls[i]))
            .header("content-type", "application/json")
            .send(body.to_string())
            .ok()?;
        if response.status() != 200 {
            return None;
        }
        serde_json::from_str(&response.body_mut().read_to_string().ok()?).ok()
    }

    /// POST to the first member that answers 200; its answer.
    pub fn post(&self, path: &str, body: Value) -> Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        let n = self.urls.len();
        loop {
            let first = self.last.load(Ordering::Relaxed);
            for k in 0..n {
                let i = (first + k) % n;
                if let Some(answer) = self.try_post(i, path, &body) {
                    self.last.store(i, Ordering::Relaxed);
                    return answer;
                }
            }
            assert!(Instant::now() < deadline, "no etcd member took {path}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Write a Kratos ServiceInstance the way Kratos's Go registry does; the revision
    /// etcd wrote it at.
    pub fn put_instance(&self, name: &str, id: &str, version: &str, endpoints: &[&str]) -> i64 {
        let (key, value) = kratos_instance(name, id, version, endpoints);
        let answer = self.post("/v3/kv/put", put_body(&key, &value, None));
        answer["header"]["revision"].as_str().unwrap().parse().unwrap()
    }

    /// The values under a prefix, decoded.
    pub fn get_prefix(&self, prefix: &str) -> Vec<(String, String)> {
        decode_kvs(&self.post("/v3/kv/range", prefix_range(prefix)))
    }
}
