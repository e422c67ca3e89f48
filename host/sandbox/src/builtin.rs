//! The standard providers, compiled from `providers/` by the build script and embedded.

/// A provider that ships inside the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Builtin {
    /// `Services` configuration section and `services__*` environment variables.
    Config,
    /// DNS SRV records, looked up by the host.
    DnsSrv,
    /// DNS A/AAAA records of the service name.
    Dns,
    /// Kratos-style instances in etcd, with watch and registration.
    Etcd,
    /// Kratos-style instances in ZooKeeper, with watch and registration (over TCP).
    ZooKeeper,
    /// The service name itself; always last.
    PassThrough,
}

impl Builtin {
    /// The builtins a `[[provider]]` table may name.
    pub const ALL_CONFIGURABLE: &[Builtin] = &[
        Builtin::Config,
        Builtin::DnsSrv,
        Builtin::Dns,
        Builtin::Etcd,
        Builtin::ZooKeeper,
    ];

    /// Its name in the config (`builtin = "dns-srv"`) and in answers.
    pub fn name(self) -> &'static str {
        match self {
            Builtin::Config => "config",
            Builtin::DnsSrv => "dns-srv",
            Builtin::Dns => "dns",
            Builtin::Etcd => "etcd",
            Builtin::ZooKeeper => "zookeeper",
            Builtin::PassThrough => "pass-through",
        }
    }

    /// The builtin called `name`.
    pub fn from_name(name: &str) -> Option<Builtin> {
        [
            Builtin::Config,
            Builtin::DnsSrv,
            Builtin::Dns,
            Builtin::Etcd,
            Builtin::ZooKeeper,
            Builtin::PassThrough,
        ]
        .into_iter()
        .find(|b| b.name() == name)
    }

    /// The component's bytes.
    pub fn wasm(self) -> &'static [u8] {
        match self {
            Builtin::Config => include_bytes!(concat!(env!("OUT_DIR"), "/config.wasm")),
            Builtin::DnsSrv => include_bytes!(concat!(env!("OUT_DIR"), "/dns-srv.wasm")),
            Builtin::Dns => include_bytes!(concat!(env!("OUT_DIR"), "/dns.wasm")),
            Builtin::Etcd => include_bytes!(concat!(env!("OUT_DIR"), "/etcd.wasm")),
            Builtin::ZooKeeper => include_bytes!(concat!(env!("OUT_DIR"), "/zookeeper.wasm")),
            Builtin::PassThrough => include_bytes!(concat!(env!("OUT_DIR"), "/pass-through.wasm")),
        }
    }
}
