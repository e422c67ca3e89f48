//! The subset of ZooKeeper's wire format (jute records, big-endian, each packet behind
//! a 4-byte length) that discovery, watches and registration need. Pure functions over
//! byte slices, so they are tested natively and fuzzed (`fuzz/`, by path): a reader
//! never panics and never allocates more than the bytes it was given can hold.
//!
//! No maintained Rust ZooKeeper client builds for `wasm32-wasip2` (they are tokio-based
//! and async); the dozen records here are all a Kratos registry uses.

/// Operation codes (`ZooDefs.OpCode`).
pub mod op {
    pub const CREATE: i32 = 1;
    pub const DELETE: i32 = 2;
    pub const EXISTS: i32 = 3;
    pub const GET_DATA: i32 = 4;
    pub const PING: i32 = 11;
    pub const GET_CHILDREN2: i32 = 12;
    pub const AUTH: i32 = 100;
    pub const CLOSE_SESSION: i32 = -11;
}

/// The transaction ids the server reserves for packets that answer no request of ours.
pub mod xid {
    /// A watch fired.
    pub const NOTIFICATION: i32 = -1;
    pub const PING: i32 = -2;
    pub const AUTH: i32 = -4;
}

/// Server error codes (`KeeperException.Code`) the provider acts on.
pub mod code {
    pub const OK: i32 = 0;
    pub const NO_NODE: i32 = -101;
    pub const NO_AUTH: i32 = -102;
    pub const BAD_VERSION: i32 = -103;
    pub const NODE_EXISTS: i32 = -110;
    pub const AUTH_FAILED: i32 = -115;
}

/// `CreateMode.EPHEMERAL`.
pub const EPHEMERAL: i32 = 1;
/// `ZooDefs.Perms.ALL`.
pub const PERM_ALL: i32 = 0x1f;

/// The name of a server error code, for messages.
pub fn code_name(code: i32) -> &'static str {
    match code {
        0 => "ok",
        -1 => "system error",
        -2 => "runtime inconsistency",
        -3 => "data inconsistency",
        -4 => "connection loss",
        -5 => "marshalling error",
        -6 => "unimplemented",
        -7 => "operation timeout",
        -8 => "bad arguments",
        -13 => "new config no quorum",
        -14 => "reconfig in progress",
        -100 => "API error",
        -101 => "no node",
        -102 => "not authenticated (NoAuth)",
        -103 => "bad version",
        -108 => "no children for ephemerals",
        -110 => "node exists",
        -111 => "not empty",
        -112 => "session expired",
        -113 => "invalid callback",
        -114 => "invalid ACL",
        -115 => "authentication failed",
        -118 => "session moved",
        -119 => "not read-only",
        -120 => "ephemeral on local session",
        -121 => "no watcher",
        -122 => "request timeout",
        -123 => "reconfig disabled",
        -124 => "session closed because it is required",
        -125 => "quota exceeded",
        -127 => "throttled",
        _ => "unknown error",
    }
}

/// A malformed packet: what was being read, in one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub String);

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One outgoing packet, length prefix included.
pub struct Packet(Vec<u8>);

impl Packet {
    /// A request packet: `RequestHeader { xid, type }`, then the record.
    pub fn request(xid: i32, op: i32) -> Packet {
        Packet::bare().int(xid).int(op)
    }

    /// A packet with no header (the connect request).
    pub fn bare() -> Packet {
        Packet(vec![0; 4])
    }

    pub fn int(mut self, value: i32) -> Packet {
        self.0.extend_from_slice(&value.to_be_bytes());
        self
    }

    pub fn long(mut self, value: i64) -> Packet {
        self.0.extend_from_slice(&value.to_be_bytes());
        self
    }

    pub fn bool(mut self, value: bool) -> Packet {
        self.0.push(u8::from(value));
        self
    }

    /// A byte buffer (`-1` length for none).
    pub fn buffer(self, value: Option<&[u8]>) -> Packet {
        match value {
            None => self.int(-1),
            Some(bytes) => {
                let mut packet = self.int(len_i32(bytes.len()));
                packet.0.extend_from_slice(bytes);
                packet
            }
        }
    }

    pub fn string(self, value: &str) -> Packet {
        self.buffer(Some(value.as_bytes()))
    }

    /// A `vector<ACL>`: each `{perms, Id {scheme, id}}`.
    pub fn acl(self, acl: &[Acl]) -> Packet {
        let mut packet = self.int(len_i32(acl.len()));
        for entry in acl {
            packet = packet.int(entry.perms).string(&entry.scheme).string(&entry.id);
        }
        packet
    }

    /// The bytes to send, with the length in front.
    pub fn finish(mut self) -> Vec<u8> {
        let len = len_i32(self.0.len() - 4);
        self.0[..4].copy_from_slice(&len.to_be_bytes());
        self.0
    }
}

fn len_i32(len: usize) -> i32 {
    // Packets are bounded far below 2 GiB (the server's jute.maxbuffer is 1 MiB by
    // default); a larger one is a bug, not an input.
    i32::try_from(len).expect("a ZooKeeper record under 2 GiB")
}

/// One access-control entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acl {
    pub perms: i32,
    pub scheme: String,
    pub id: String,
}

impl Acl {
    /// Anyone may do anything (`ZooDefs.Ids.OPEN_ACL_UNSAFE`), as Kratos writes
    /// without a digest.
    pub fn open() -> Vec<Acl> {
        vec![Acl {
            perms: PERM_ALL,
            scheme: "world".into(),
            id: "anyone".into(),
        }]
    }
}

/// Reads records from one packet's payload; every read checks its bounds.
pub struct Reader<'a> {
    bytes: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// `what` names the record in errors ("getChildren2 reply").
    pub fn new(bytes: &'a [u8], what: &'static str) -> Reader<'a> {
        Reader { bytes, what }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        if self.bytes.len() < n {
            return Err(Malformed(format!(
                "{}: {n} bytes wanted, {} left",
                self.what,
                self.bytes.len()
            )));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    pub fn int(&mut self) -> Result<i32, Malformed> {
        let bytes = self.take(4)?;
        Ok(i32::from_be_bytes(bytes.try_into().expect("four bytes")))
    }

    pub fn long(&mut self) -> Result<i64, Malformed> {
        let bytes = self.take(8)?;
        Ok(i64::from_be_bytes(bytes.try_into().expect("eight bytes")))
    }

    /// A buffer; a `-1` length (none) reads as empty.
    pub fn buffer(&mut self) -> Result<&'a [u8], Malformed> {
        let len = self.int()?;
        if len < 0 {
            return Ok(&[]);
        }
        self.take(len as usize)
    }

    pub fn string(&mut self) -> Result<String, Malformed> {
        let what = self.what;
        let bytes = self.buffer()?;
        String::from_utf8(bytes.to_vec()).map_err(|_| Malformed(format!("{what}: a string is not UTF-8")))
    }

    /// A `vector<ustring>`; a `-1` count reads as empty.
    pub fn strings(&mut self) -> Result<Vec<String>, Malformed> {
        let count = self.int()?;
        // Each string takes at least its 4-byte length: a count past what is left is a
        // lie, and must not become a huge allocation.
        if count > 0 && count as usize > self.bytes.len() / 4 {
            return Err(Malformed(format!(
                "{}: {count} strings in {} bytes",
                self.what,
                self.bytes.len()
            )));
        }
        (0..count.max(0)).map(|_| self.string()).collect()
    }

    pub fn stat(&mut self) -> Result<Stat, Malformed> {
        Ok(Stat {
            czxid: self.long()?,
            mzxid: self.long()?,
            ctime: self.long()?,
            mtime: self.long()?,
            version: self.int()?,
            cversion: self.int()?,
            aversion: self.int()?,
            ephemeral_owner: self.long()?,
            data_length: self.int()?,
            num_children: self.int()?,
            pzxid: self.long()?,
        })
    }
}

/// A znode's metadata.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stat {
    pub czxid: i64,
    /// The transaction that last changed the data.
    pub mzxid: i64,
    pub ctime: i64,
    pub mtime: i64,
    pub version: i32,
    pub cversion: i32,
    pub aversion: i32,
    /// The session owning an ephemeral node; 0 for a persistent one.
    pub ephemeral_owner: i64,
    pub data_length: i32,
    pub num_children: i32,
    /// The transaction that last added or removed a child.
    pub pzxid: i64,
}

/// The server's answer to a connect request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectResponse {
    /// The negotiated session timeout; 0 when the session asked for has expired.
    pub timeout_ms: i32,
    pub session_id: i64,
    pub password: Vec<u8>,
}

/// `ConnectRequest`: a new session (`session_id` 0) or an old one resumed.
pub fn connect_request(last_zxid: i64, timeout_ms: i32, session_id: i64, password: &[u8]) -> Vec<u8> {
    Packet::bare()
        .int(0) // protocol version
        .long(last_zxid)
        .int(timeout_ms)
        .long(session_id)
        .buffer(Some(password))
        .bool(false) // read-only: no
        .finish()
}

pub fn parse_connect_response(payload: &[u8]) -> Result<ConnectResponse, Malformed> {
    let mut r = Reader::new(payload, "connect response");
    let _protocol = r.int()?;
    let timeout_ms = r.int()?;
    let session_id = r.long()?;
    let password = r.buffer()?.to_vec();
    // A read-only flag follows from 3.4 servers on; older ones stop here.
    Ok(ConnectResponse {
        timeout_ms,
        session_id,
        password,
    })
}

/// `ReplyHeader`, in front of every packet after the connect response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyHeader {
    pub xid: i32,
    pub zxid: i64,
    pub err: i32,
}

/// A reply's header and the record after it.
pub fn parse_reply(payload: &[u8]) -> Result<(ReplyHeader, &[u8]), Malformed> {
    let mut r = Reader::new(payload, "reply header");
    let header = ReplyHeader {
        xid: r.int()?,
        zxid: r.long()?,
        err: r.int()?,
    };
    Ok((header, r.bytes))
}

/// A fired watch (`WatcherEvent`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatcherEvent {
    pub kind: i32,
    pub state: i32,
    pub path: String,
}

pub fn parse_watcher_event(record: &[u8]) -> Result<WatcherEvent, Malformed> {
    let mut r = Reader::new(record, "watch notification");
    Ok(WatcherEvent {
        kind: r.int()?,
        state: r.int()?,
        path: r.string()?,
    })
}

/// `GetChildren2Response`: the children's names and the parent's stat.
pub fn parse_children(record: &[u8]) -> Result<(Vec<String>, Stat), Malformed> {
    let mut r = Reader::new(record, "getChildren2 reply");
    let children = r.strings()?;
    let stat = r.stat()?;
    Ok((children, stat))
}

/// `GetDataResponse`: the data and its stat.
pub fn parse_data(record: &[u8]) -> Result<(Vec<u8>, Stat), Malformed> {
    let mut r = Reader::new(record, "getData reply");
    let data = r.buffer()?.to_vec();
    let stat = r.stat()?;
    Ok((data, stat))
}

/// `ExistsResponse`.
pub fn parse_stat(record: &[u8]) -> Result<Stat, Malformed> {
    Reader::new(record, "exists reply").stat()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connect_request_is_laid_out_as_the_java_client_writes_it() {
        let bytes = connect_request(7, 4000, 0x0102, b"pw");
        assert_eq!(
            bytes,
            [
                0, 0, 0, 31, // length
                0, 0, 0, 0, // protocol version
                0, 0, 0, 0, 0, 0, 0, 7, // last zxid seen
                0, 0, 0x0f, 0xa0, // timeout 4000
                0, 0, 0, 0, 0, 0, 1, 2, // session id
                0, 0, 0, 2, b'p', b'w', // password
                0,    // read-only
            ]
        );
    }

    #[test]
    fn replies_and_records_read_back() {
        let payload = Packet::bare().int(5).long(99).int(code::NO_NODE).finish();
        let (header, rest) = parse_reply(&payload[4..]).unwrap();
        assert_eq!(
            header,
            ReplyHeader {
                xid: 5,
                zxid: 99,
                err: -101
            }
        );
        assert!(rest.is_empty());

        let mut stat = Packet::bare();
        for n in 1..=4 {
            stat = stat.long(n);
        }
        let record = stat.int(5).int(6).int(7).long(8).int(9).int(10).long(11).finish();
        let stat = parse_stat(&record[4..]).unwrap();
        assert_eq!(
            (
                stat.czxid,
                stat.mzxid,
                stat.version,
                stat.ephemeral_owner,
                stat.pzxid
            ),
            (1, 2, 5, 8, 11)
        );

        let children = Packet::bare().int(2).string("a").string("bé").finish();
        let mut with_stat = children[4..].to_vec();
        with_stat.extend_from_slice(&record[4..]);
        let (names, parent) = parse_children(&with_stat).unwrap();
        assert_eq!(names, ["a", "bé"]);
        assert_eq!(parent.pzxid, 11);

        let event = Packet::bare()
            .int(4) // NodeChildrenChanged
            .int(3)
            .string("/microservices/hello")
            .finish();
        assert_eq!(
            parse_watcher_event(&event[4..]).unwrap().path,
            "/microservices/hello"
        );
    }

    #[test]
    fn lies_are_errors_not_panics_or_huge_allocations() {
        // A count of two billion strings in eight bytes.
        let lie = Packet::bare().int(i32::MAX).int(0).finish();
        assert!(parse_children(&lie[4..]).is_err());
        // A buffer longer than the packet.
        let lie = Packet::bare().int(1000).finish();
        assert!(parse_data(&lie[4..]).is_err());
        assert!(parse_reply(&[0, 0]).is_err());
        assert!(parse_connect_response(&[]).is_err());
        let bad_utf8 = Packet::bare().int(1).int(3).int(2).raw(&[0xff, 0xfe]).finish();
        assert!(parse_watcher_event(&bad_utf8[4..]).is_err());
    }

    impl Packet {
        fn raw(mut self, bytes: &[u8]) -> Packet {
            self.0.extend_from_slice(bytes);
            self
        }
    }
}
