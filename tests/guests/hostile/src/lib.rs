//! A provider that misbehaves on request: the service name picks the attack. The
//! sandbox must contain every one of them. Services it does not know get an empty
//! answer, so the next provider in the chain answers them.

use std::cell::Cell;
use std::time::{Duration, Instant};

use wasd_sdk::{Configuration, Endpoint, Error, Provider, Query, Resolution};

struct Hostile {
    calls: Cell<u64>,
}

#[inline(never)]
#[allow(unconditional_recursion)] // The point: it only ends in a stack overflow.
fn recurse(depth: u64, pad: &mut [u8; 256]) -> u64 {
    pad[(depth % 256) as usize] = depth as u8;
    // Not a tail call: every frame stays on the stack.
    recurse(depth + 1, pad) + u64::from(pad[0])
}

/// An endpoint tagged with the instance's call count.
fn counted(host: &str, calls: u64) -> Endpoint {
    let mut endpoint = Endpoint::new(host, Some(80));
    endpoint.metadata.push(("calls".into(), calls.to_string()));
    endpoint
}

impl Provider for Hostile {
    fn configure(config: Configuration) -> Result<Self, Error> {
        // Named so (in a plugin folder: the file `trap-in-configure.wasm`), it traps
        // before it can serve anything.
        if config.name == "trap-in-configure" {
            panic!("hostile: trapping in configure, as asked");
        }
        Ok(Hostile { calls: Cell::new(0) })
    }

    fn resolve(&self, query: Query) -> Result<Resolution, Error> {
        let calls = self.calls.get() + 1;
        self.calls.set(calls);
        let leaked = |what: &str| {
            Ok(Resolution::new(vec![Endpoint::new(
                format!("leaked-{what}"),
                Some(1),
            )]))
        };
        match query.service.as_str() {
            // CPU: never returns.
            "loop" => {
                let mut x: u64 = 0;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            // Memory: grows until something stops it.
            "bomb" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "recurse" => {
                let mut pad = [0u8; 256];
                let depth = recurse(0, &mut pad);
                Ok(Resolution::new(vec![Endpoint::new(
                    format!("depth-{depth}"),
                    None,
                )]))
            }
            "panic" => panic!("hostile provider panicked on purpose"),
            // A panic message that would clear the operator's screen and forge a line.
            "panic-escape" => panic!("\x1b[2J\x1b[Hcleared\rforged: all is well"),
            // Output: far more endpoints than any limit allows.
            "huge" => {
                let endpoints = (0..200_000u32)
                    .map(|i| Endpoint::new(format!("h{i}.example"), Some(80)))
                    .collect();
                Ok(Resolution::new(endpoints))
            }
            // Output: a megabyte host name.
            "long" => Ok(Resolution::new(vec![Endpoint::new(
                "a".repeat(1 << 20),
                Some(80),
            )])),
            // A megabyte error message.
            "long-error" => Err(Error::Internal("e".repeat(1 << 20))),
            // A megabyte of stderr, then a normal answer.
            "stderr" => {
                for _ in 0..1024 {
                    eprintln!("{}", "x".repeat(1023));
                }
                Ok(Resolution::new(vec![Endpoint::new("10.9.0.1", Some(80))]))
            }
            // A flood of log lines.
            "log-flood" => {
                for i in 0..20_000 {
                    wasd_sdk::info!("flood line {i} {}", "y".repeat(100));
                }
                Ok(Resolution::new(vec![Endpoint::new("10.9.0.2", Some(80))]))
            }
            // Slow but within the limit: busy for 300 ms.
            "slow" => {
                let start = Instant::now();
                while start.elapsed() < Duration::from_millis(300) {
                    std::hint::black_box(0);
                }
                Ok(Resolution::new(vec![Endpoint::new("10.9.0.3", Some(80))]))
            }
            // Capabilities it was not granted.
            "files" => match std::fs::read_to_string("/etc/passwd") {
                Ok(_) => leaked("file"),
                Err(e) => Err(Error::Denied(format!("reading /etc/passwd: {e}"))),
            },
            "env" => match std::env::var("WASD_TEST_SECRET") {
                Ok(_) => leaked("env"),
                Err(e) => Err(Error::Denied(format!("WASD_TEST_SECRET: {e}"))),
            },
            "http" => {
                let url = format!("http://127.0.0.1:{}/", query.port.unwrap_or(9));
                match wasd_sdk::http::Request::get(url)
                    .timeout(Duration::from_millis(500))
                    .send()
                {
                    Ok(_) => leaked("http"),
                    Err(e) => Err(e.into()),
                }
            }
            "dns" => match wasd_sdk::dns::lookup_addresses("secret.internal") {
                Ok(_) => leaked("dns"),
                Err(e) => Err(Error::Denied(format!("secret.internal: {e:?}"))),
            },
            // wasi:sockets, which the host links but must not let through: TCP and UDP,
            // connecting, listening and binding, and name lookup (which would go
            // around `grants.dns`).
            "tcp-connect" => {
                let port = query.port.unwrap_or(9);
                match std::net::TcpStream::connect(("127.0.0.1", port)) {
                    Ok(_) => leaked("tcp-connect"),
                    Err(e) => Err(Error::Denied(format!("tcp connect: {e} (to 127.0.0.1:{port})"))),
                }
            }
            "tcp-listen" => match std::net::TcpListener::bind("127.0.0.1:0") {
                Ok(_) => leaked("tcp-listen"),
                Err(e) => Err(Error::Denied(format!("tcp listen: {e}"))),
            },
            "udp-send" => {
                let port = query.port.unwrap_or(9);
                let sent = std::net::UdpSocket::bind("127.0.0.1:0")
                    .and_then(|socket| socket.send_to(b"wasd-escaped", ("127.0.0.1", port)));
                match sent {
                    Ok(_) => leaked("udp-send"),
                    Err(e) => Err(Error::Denied(format!("udp send: {e} (to 127.0.0.1:{port})"))),
                }
            }
            // With `grants.tcp`: legal to a granted address (an echo server, by address
            // or by a granted name), refused anywhere else, and refused past the
            // connections one call may open.
            "tcp-echo" | "tcp-echo-name" => {
                use std::io::{BufRead, BufReader, Write};
                let port = query.port.unwrap_or(9);
                let host = if query.service == "tcp-echo" {
                    "127.0.0.1"
                } else {
                    "localhost"
                };
                let echoed = std::net::TcpStream::connect((host, port)).and_then(|mut stream| {
                    stream.write_all(b"wasd-ping\n")?;
                    let mut line = String::new();
                    BufReader::new(stream).read_line(&mut line)?;
                    Ok(line)
                });
                match echoed {
                    Ok(line) => {
                        let mut endpoint = Endpoint::new("10.9.0.7", Some(port));
                        endpoint.metadata.push(("echo".into(), line.trim().to_owned()));
                        Ok(Resolution::new(vec![endpoint]))
                    }
                    Err(e) => Err(Error::Denied(format!("tcp echo: {e} (to {host}:{port})"))),
                }
            }
            "tcp-many" => {
                let port = query.port.unwrap_or(9);
                let mut open = Vec::new();
                for n in 1..=40 {
                    match std::net::TcpStream::connect(("127.0.0.1", port)) {
                        Ok(stream) => open.push(stream),
                        Err(e) => return Err(Error::Denied(format!("tcp connect #{n}: {e}"))),
                    }
                }
                leaked("tcp-many")
            }
            "tcp-listen-any" => match std::net::TcpListener::bind("0.0.0.0:0") {
                Ok(_) => leaked("tcp-listen-any"),
                Err(e) => Err(Error::Denied(format!("tcp listen: {e}"))),
            },
            "name-lookup-other" => {
                use std::net::ToSocketAddrs;
                match ("wasd-not-granted.invalid", 80).to_socket_addrs() {
                    Ok(_) => leaked("name-lookup-other"),
                    Err(e) => Err(Error::Denied(format!("looking up wasd-not-granted.invalid: {e}"))),
                }
            }
            "name-lookup" => {
                use std::net::ToSocketAddrs;
                match ("localhost", 80).to_socket_addrs() {
                    Ok(_) => leaked("name-lookup"),
                    Err(e) => Err(Error::Denied(format!("looking up localhost: {e}"))),
                }
            }
            // Its own stdout, which the host discards, then a normal answer.
            "stdout" => {
                for _ in 0..64 {
                    println!("hostile-stdout {}", "s".repeat(100));
                }
                Ok(Resolution::new(vec![Endpoint::new("10.9.0.5", Some(80))]))
            }
            // Legal: says how many calls this instance has served, so a test sees
            // when the host retires it.
            "count" => Ok(Resolution::new(vec![counted("10.9.0.6", calls)])),
            // Legal when granted: one HTTP request per call, then the same count.
            "fetch" => {
                let url = format!("http://127.0.0.1:{}/", query.port.unwrap_or(9));
                match wasd_sdk::http::Request::get(url)
                    .timeout(Duration::from_secs(2))
                    .send()
                {
                    Ok(_) => Ok(Resolution::new(vec![counted("10.9.0.7", calls)])),
                    Err(e) => Err(e.into()),
                }
            }
            // Traps on every other call of an instance.
            "flaky" if calls.is_multiple_of(2) => core::arch::wasm32::unreachable(),
            "flaky" => Ok(Resolution::new(vec![Endpoint::new("10.9.0.4", Some(80))])),
            _ => Ok(Resolution::empty()),
        }
    }
}

wasd_sdk::export!(Hostile);
