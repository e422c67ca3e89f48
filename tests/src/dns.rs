//! A real DNS server for tests: Debian's dnsmasq on 127.0.0.1 and a free high port,
//! authoritative for `cluster.local` and `custom.test`, stopped on drop.

use std::net::{TcpListener, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running dnsmasq.
pub struct DnsServer {
    child: Option<Child>,
    port: u16,
    ttl: u32,
}

impl DnsServer {
    /// Start dnsmasq serving `records` (dnsmasq options such as
    /// `--srv-host=_default._tcp.basket.cluster.local,basket-1.cluster.local,8080,0,10`)
    /// with every TTL set to `ttl` seconds.
    pub fn start(ttl: u32, records: &[&str]) -> DnsServer {
        let mut server = DnsServer {
            child: None,
            port: free_port(),
            ttl,
        };
        server.restart(records);
        server
    }

    /// `127.0.0.1:PORT`, for the host config's `[dns] servers`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stop the server; queries now fail (connection refused or time out).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stop, then start again on the same port with new records.
    pub fn restart(&mut self, records: &[&str]) {
        self.stop();
        let child = Command::new(dnsmasq())
            .args([
                "-k",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--pid-file=",
                "--listen-address=127.0.0.1",
                "--bind-interfaces",
                "--local=/cluster.local/",
                "--local=/custom.test/",
            ])
            .arg(format!("--port={}", self.port))
            .arg(format!("--local-ttl={}", self.ttl))
            .args(records)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting dnsmasq (scripts/setup installs Debian's dnsmasq-base)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "dnsmasq did not start on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A port free for both UDP and TCP on 127.0.0.1.
fn free_port() -> u16 {
    loop {
        let udp = UdpSocket::bind("127.0.0.1:0").expect("binding a UDP port");
        let port = udp.local_addr().unwrap().port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// dnsmasq on `PATH`, or where Debian installs it (`/usr/sbin`, not on a normal user's
/// `PATH`).
fn dnsmasq() -> std::path::PathBuf {
    let sbin = std::path::Path::new("/usr/sbin/dnsmasq");
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|dir| dir.join("dnsmasq").is_file()))
        .unwrap_or(false);
    if !on_path && sbin.is_file() {
        sbin.to_path_buf()
    } else {
        "dnsmasq".into()
    }
}
