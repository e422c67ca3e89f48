//! A ZooKeeper session over one TCP connection (`std::net`, which the host lets through
//! only to the addresses in `grants.tcp`): connect or resume, digest auth, requests
//! (pipelined where a read fans out), watch notifications and pings. Blocking, with a
//! deadline on every read and write.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::jute::{self, Packet, ReplyHeader, Stat, WatcherEvent, code, op, xid};

/// A session to create (`id` 0) or resume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub id: i64,
    pub password: Vec<u8>,
    /// Asked for on connect; the server clamps it to its own bounds.
    pub timeout_ms: i32,
}

impl Session {
    pub fn new(timeout_ms: i32) -> Session {
        Session {
            id: 0,
            password: vec![0; 16],
            timeout_ms,
        }
    }

    /// `{id}:{timeout}:{password}`, all hex but the timeout: what the host keeps as the
    /// lease and hands back to `keep-alive` and `deregister`.
    pub fn to_lease(&self) -> String {
        let password: String = self.password.iter().map(|b| format!("{b:02x}")).collect();
        // Unsigned: ids from servers numbered past 127 are negative as an i64.
        format!("{:x}:{}:{password}", self.id as u64, self.timeout_ms)
    }

    pub fn from_lease(lease: &str) -> Option<Session> {
        let mut parts = lease.split(':');
        let id = u64::from_str_radix(parts.next()?, 16).ok()? as i64;
        let timeout_ms = parts.next()?.parse().ok()?;
        let hex = parts.next()?;
        if parts.next().is_some() || hex.len() % 2 != 0 || id == 0 {
            return None;
        }
        let password = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
            .collect::<Option<Vec<u8>>>()?;
        Some(Session {
            id,
            password,
            timeout_ms,
        })
    }
}

/// A znode's data and stat.
pub type Node = (Vec<u8>, Stat);

/// Why a call failed.
#[derive(Debug)]
pub enum Fault {
    /// The connection failed (refused, reset, closed, timed out, a malformed packet):
    /// another server, or a new connection, may do better.
    Io(String),
    /// The session asked for has expired: the server said so on connect.
    Expired,
    /// The server answered with an error code (`jute::code`).
    Code(i32),
}

/// A packet that does not parse: the connection is no longer trusted.
impl From<jute::Malformed> for Fault {
    fn from(malformed: jute::Malformed) -> Fault {
        Fault::Io(malformed.to_string())
    }
}

impl Fault {
    pub fn describe(&self) -> String {
        match self {
            Fault::Io(reason) => reason.clone(),
            Fault::Expired => "the session has expired".into(),
            Fault::Code(code) => format!("{} ({code})", jute::code_name(*code)),
        }
    }
}

/// Where and how to connect.
pub struct Dial<'a> {
    /// `host:port` of every server, tried in order from `first`.
    pub servers: &'a [String],
    pub first: usize,
    /// Bounds connecting and every request.
    pub timeout: Duration,
    /// Digest credentials (`user:password`), sent right after connecting.
    pub auth: Option<&'a str>,
    /// The largest packet read.
    pub max_packet: usize,
}

/// One live session on one server.
pub struct Connection {
    stream: TcpStream,
    /// The server it is connected to, as configured, and its index.
    pub server: String,
    pub index: usize,
    pub session: Session,
    /// The timeout the server granted.
    pub negotiated: Duration,
    timeout: Duration,
    max_packet: usize,
    next_xid: i32,
    /// Bytes received and not yet framed.
    pending: Vec<u8>,
    /// Watch notifications that came in while waiting for replies.
    events: VecDeque<WatcherEvent>,
    last_sent: Instant,
    last_received: Instant,
}

impl Connection {
    /// Connect to the first server that answers, from `dial.first` round the list, and
    /// create or resume `session`. An expired session ends the search: it is expired
    /// everywhere. The error names every server tried and why.
    pub fn open(dial: &Dial<'_>, session: &Session) -> Result<Connection, Fault> {
        let mut tried = Vec::new();
        for step in 0..dial.servers.len() {
            let index = (dial.first + step) % dial.servers.len();
            let server = &dial.servers[index];
            match Connection::open_one(dial, index, session) {
                Ok(connection) => return Ok(connection),
                Err(Fault::Io(reason)) => tried.push(format!("{server}: {reason}")),
                Err(fault) => return Err(fault),
            }
        }
        Err(Fault::Io(tried.join("; ")))
    }

    fn open_one(dial: &Dial<'_>, index: usize, session: &Session) -> Result<Connection, Fault> {
        let server = &dial.servers[index];
        let deadline = Instant::now() + dial.timeout;
        // The host looks the name up, and only a name in `grants.tcp` resolves.
        let addresses = server
            .to_socket_addrs()
            .map_err(|e| Fault::Io(format!("looking up {server}: {e}")))?;
        let mut last = None;
        let mut stream = None;
        for address in addresses {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match TcpStream::connect_timeout(&address, left) {
                // Under wasi-libc a refused connect may still come back `Ok`, and
                // fail at the first write as "not connected"; a connected socket has a
                // peer.
                Ok(s) => match s.peer_addr() {
                    Ok(_) => {
                        stream = Some(s);
                        break;
                    }
                    Err(e) => last = Some(e),
                },
                Err(e) => last = Some(e),
            }
        }
        let stream = stream.ok_or_else(|| {
            Fault::Io(match last {
                Some(e) => format!("connecting: {e}"),
                None => "no address to connect to".into(),
            })
        })?;
        let _ = stream.set_nodelay(true);
        let mut connection = Connection {
            stream,
            server: server.clone(),
            index,
            session: session.clone(),
            negotiated: Duration::ZERO,
            timeout: dial.timeout,
            max_packet: dial.max_packet,
            next_xid: 1,
            pending: Vec::new(),
            events: VecDeque::new(),
            last_sent: Instant::now(),
            last_received: Instant::now(),
        };
        connection.send(&jute::connect_request(
            0,
            session.timeout_ms,
            session.id,
            &session.password,
        ))?;
        let payload = connection
            .packet(deadline)?
            .ok_or_else(|| Fault::Io("no answer to the connect request in time".into()))?;
        let answer = jute::parse_connect_response(&payload)?;
        if answer.timeout_ms <= 0 {
            return Err(Fault::Expired);
        }
        connection.session = Session {
            id: answer.session_id,
            password: answer.password,
            timeout_ms: session.timeout_ms,
        };
        connection.negotiated = Duration::from_millis(answer.timeout_ms as u64);
        if let Some(auth) = dial.auth {
            connection.send(
                &Packet::request(xid::AUTH, op::AUTH)
                    .int(0)
                    .string("digest")
                    .buffer(Some(auth.as_bytes()))
                    .finish(),
            )?;
            let (header, _) = connection.reply(xid::AUTH)?;
            if header.err != code::OK {
                return Err(Fault::Code(header.err));
            }
        }
        Ok(connection)
    }

    fn send(&mut self, bytes: &[u8]) -> Result<(), Fault> {
        self.stream
            .set_write_timeout(Some(self.timeout))
            .and_then(|()| self.stream.write_all(bytes))
            .map_err(|e| Fault::Io(format!("sending: {e}")))?;
        self.last_sent = Instant::now();
        Ok(())
    }

    /// The next packet's payload, or none if `deadline` passed first. Partial reads are
    /// kept, so a deadline never breaks the framing.
    fn packet(&mut self, deadline: Instant) -> Result<Option<Vec<u8>>, Fault> {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            if self.pending.len() >= 4 {
                let len = i32::from_be_bytes(self.pending[..4].try_into().expect("four bytes"));
                let len = usize::try_from(len)
                    .ok()
                    .filter(|len| *len <= self.max_packet)
                    .ok_or_else(|| {
                        Fault::Io(format!(
                            "a packet of {len} bytes, past the {} bytes of settings.max-response",
                            self.max_packet
                        ))
                    })?;
                if self.pending.len() >= 4 + len {
                    let payload = self.pending[4..4 + len].to_vec();
                    self.pending.drain(..4 + len);
                    return Ok(Some(payload));
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.stream
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .map_err(|e| Fault::Io(format!("setting a read timeout: {e}")))?;
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(Fault::Io("the server closed the connection".into())),
                Ok(n) => {
                    self.pending.extend_from_slice(&chunk[..n]);
                    self.last_received = Instant::now();
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(Fault::Io(format!("receiving: {e}"))),
            }
        }
    }

    /// Read until the reply to `xid`; notifications met on the way are queued.
    fn reply(&mut self, want: i32) -> Result<(ReplyHeader, Vec<u8>), Fault> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let payload = self
                .packet(deadline)?
                .ok_or_else(|| Fault::Io(format!("no reply within {:?}", self.timeout)))?;
            let (header, record) = jute::parse_reply(&payload)?;
            match header.xid {
                x if x == want => return Ok((header, record.to_vec())),
                xid::NOTIFICATION => self.queue_event(record)?,
                // A ping's answer, or the reply to a request an earlier, abandoned call
                // left behind: replies come in order, so it is older than ours.
                _ => {}
            }
        }
    }

    fn queue_event(&mut self, record: &[u8]) -> Result<(), Fault> {
        self.events.push_back(jute::parse_watcher_event(record)?);
        Ok(())
    }

    fn xid(&mut self) -> i32 {
        let xid = self.next_xid;
        // Positive, and never one of the reserved negative ids.
        self.next_xid = if xid == i32::MAX { 1 } else { xid + 1 };
        xid
    }

    /// One request and its reply: the reply's record, or the server's error code.
    fn call(&mut self, op: i32, body: impl FnOnce(Packet) -> Packet) -> Result<Vec<u8>, Fault> {
        let xid = self.xid();
        self.send(&body(Packet::request(xid, op)).finish())?;
        let (header, record) = self.reply(xid)?;
        match header.err {
            code::OK => Ok(record),
            err => Err(Fault::Code(err)),
        }
    }

    /// The children of `path` and its stat; none if it does not exist. `watch` leaves
    /// a child watch (or, when it does not exist, a creation watch) behind.
    pub fn children(&mut self, path: &str, watch: bool) -> Result<Option<(Vec<String>, Stat)>, Fault> {
        match self.call(op::GET_CHILDREN2, |p| p.string(path).bool(watch)) {
            Ok(record) => Ok(Some(jute::parse_children(&record)?)),
            Err(Fault::Code(code::NO_NODE)) => {
                if watch && self.exists(path, true)?.is_some() {
                    // Created in between: read it again.
                    return self.children(path, watch);
                }
                Ok(None)
            }
            Err(fault) => Err(fault),
        }
    }

    /// The data of every path, in one round trip (requests pipelined, replies in
    /// order); a path deleted meanwhile is none.
    pub fn get_all(&mut self, paths: &[String], watch: bool) -> Result<Vec<Option<Node>>, Fault> {
        let mut batch = Vec::new();
        let mut xids = Vec::with_capacity(paths.len());
        for path in paths {
            let xid = self.xid();
            xids.push(xid);
            batch.extend_from_slice(
                &Packet::request(xid, op::GET_DATA)
                    .string(path)
                    .bool(watch)
                    .finish(),
            );
            // Sent in batches, so neither side's buffer fills while the other waits.
            if batch.len() >= 64 * 1024 {
                self.send(&batch)?;
                batch.clear();
            }
        }
        self.send(&batch)?;
        let mut found = Vec::with_capacity(paths.len());
        for xid in xids {
            let (header, record) = self.reply(xid)?;
            found.push(match header.err {
                code::OK => Some(jute::parse_data(&record)?),
                code::NO_NODE => None,
                err => return Err(Fault::Code(err)),
            });
        }
        Ok(found)
    }

    /// The stat of `path`, none if it does not exist.
    pub fn exists(&mut self, path: &str, watch: bool) -> Result<Option<Stat>, Fault> {
        match self.call(op::EXISTS, |p| p.string(path).bool(watch)) {
            Ok(record) => Ok(Some(jute::parse_stat(&record)?)),
            Err(Fault::Code(code::NO_NODE)) => Ok(None),
            Err(fault) => Err(fault),
        }
    }

    pub fn create(&mut self, path: &str, data: &[u8], acl: &[jute::Acl], flags: i32) -> Result<(), Fault> {
        self.call(op::CREATE, |p| {
            p.string(path).buffer(Some(data)).acl(acl).int(flags)
        })
        .map(drop)
    }

    /// Delete `path` if its version is still `version` (-1: any).
    pub fn delete(&mut self, path: &str, version: i32) -> Result<(), Fault> {
        self.call(op::DELETE, |p| p.string(path).int(version)).map(drop)
    }

    /// End the session: the server deletes its ephemeral nodes now, not after the
    /// timeout.
    pub fn close_session(mut self) -> Result<(), Fault> {
        self.call(op::CLOSE_SESSION, |p| p).map(drop)
    }

    /// The next watch notification, or none by `deadline`. Pings the server while
    /// waiting, so the session outlives a long wait.
    pub fn next_event(&mut self, deadline: Instant) -> Result<Option<WatcherEvent>, Fault> {
        loop {
            if let Some(event) = self.events.pop_front() {
                return Ok(Some(event));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let ping_every = (self.negotiated / 3).max(Duration::from_millis(100));
            if now >= self.last_sent + ping_every {
                self.send(&Packet::request(xid::PING, op::PING).finish())?;
            }
            let until = deadline.min(self.last_sent + ping_every);
            if let Some(payload) = self.packet(until)? {
                let (header, record) = jute::parse_reply(&payload)?;
                if header.xid == xid::NOTIFICATION {
                    self.queue_event(record)?;
                }
            } else if Instant::now() >= self.last_received + ping_every + self.timeout {
                // The server answers every ping: a whole ping period and a timeout of
                // silence is a server that is gone or frozen.
                return Err(Fault::Io(format!(
                    "no answer to a ping within {:?}",
                    self.timeout
                )));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Session;

    #[test]
    fn leases_round_trip_and_reject_junk() {
        let session = Session {
            id: 0x1000_0abc_0000_0001,
            password: vec![0, 1, 0xfe, 0xff],
            timeout_ms: 15_000,
        };
        let lease = session.to_lease();
        assert_eq!(lease, "10000abc00000001:15000:0001feff");
        assert_eq!(Session::from_lease(&lease), Some(session));
        for junk in [
            "",
            "x",
            "1:2",
            "0:15000:00",
            "1:15000:0",
            "1:15000:zz",
            "1:t:00",
            "1:1:00:00",
            "1:1:é0",
        ] {
            assert_eq!(Session::from_lease(junk), None, "{junk}");
        }
    }
}
