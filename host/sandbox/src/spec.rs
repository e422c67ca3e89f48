//! What a sandboxed provider is made from, as the configuration describes it: its
//! module, settings, grants, limits and TLS files, and the list of files it reads.

use std::path::{Path, PathBuf};
use std::time::Duration;

use wasd_core::Error;

use crate::builtin::Builtin;

/// Default cap on a provider's linear memory.
pub const DEFAULT_MAX_MEMORY: usize = 64 << 20;
/// Default deadline for one provider call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
/// Default cap on the endpoints in one answer.
pub const DEFAULT_MAX_ENDPOINTS: usize = 10_000;

/// One provider as configured.
#[derive(Clone)]
pub struct ProviderSpec {
    /// The provider's name, unique in the chain.
    pub name: String,
    /// Where its component comes from.
    pub module: ModuleSource,
    /// The `settings` table as a JSON object.
    pub settings: String,
    /// What it may use.
    pub grants: Grants,
    /// How much it may use.
    pub limits: Limits,
    /// Its outgoing TLS files.
    pub tls: TlsSpec,
    /// Found in the plugin folder, not listed in the config.
    pub unlisted: bool,
    /// The module's expected sha256 (lower-case hex); a module that differs is refused.
    pub sha256: Option<String>,
}

/// TLS files for a provider's outgoing HTTPS (the host does the TLS).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsSpec {
    /// PEM CA certificates trusted instead of the web PKI roots.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain and key, for mutual TLS.
    pub client: Option<(PathBuf, PathBuf)>,
}

impl ProviderSpec {
    /// A load failure of this provider.
    pub fn load_error(&self, reason: String) -> Error {
        Error::Load {
            provider: self.name.clone(),
            source_name: self.module.to_string(),
            reason,
        }
    }
}

// Settings may hold secrets (an etcd password): Debug shows only their size.
impl std::fmt::Debug for ProviderSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderSpec")
            .field("name", &self.name)
            .field("module", &self.module)
            .field("settings", &format_args!("<{} bytes>", self.settings.len()))
            .field("grants", &self.grants)
            .field("limits", &self.limits)
            .field("tls", &self.tls)
            .field("sha256", &self.sha256)
            .finish()
    }
}

/// Where a provider's component comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModuleSource {
    /// A standard provider embedded in the host.
    Builtin(Builtin),
    /// A component file.
    File(PathBuf),
}

impl std::fmt::Display for ModuleSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModuleSource::Builtin(b) => write!(f, "builtin:{}", b.name()),
            ModuleSource::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// Capabilities granted to one provider. Everything not listed is denied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    /// Files the host reads and passes to `configure`: (as written, resolved path).
    pub files: Vec<(String, PathBuf)>,
    /// Environment variable names the provider sees; a trailing `*` matches a prefix.
    /// Compared case-insensitively.
    pub env: Vec<String>,
    /// DNS zones the provider may look up (`cluster.local` covers its subdomains; `*`
    /// is every name).
    pub dns: Vec<String>,
    /// HTTP origins the provider may call (`http://127.0.0.1:2379`).
    pub http: Vec<String>,
    /// Addresses the provider may open TCP connections to (`127.0.0.1:2181`,
    /// `zk-2.internal:2181`), normalised by [`crate::normalize_tcp_target`].
    pub tcp: Vec<String>,
}

impl Grants {
    /// Whether an environment variable is granted.
    pub fn allows_env(&self, name: &str) -> bool {
        self.env.iter().any(|pattern| match pattern.strip_suffix('*') {
            Some(prefix) => name
                .get(..prefix.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(prefix)),
            None => name.eq_ignore_ascii_case(pattern),
        })
    }
}

/// Sandbox limits of one provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest linear memory, in bytes.
    pub max_memory: usize,
    /// Longest time one call may run.
    pub timeout: Duration,
    /// Most endpoints in one answer.
    pub max_endpoints: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_memory: DEFAULT_MAX_MEMORY,
            timeout: DEFAULT_TIMEOUT,
            max_endpoints: DEFAULT_MAX_ENDPOINTS,
        }
    }
}

/// One file a provider is made from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputFile<'a> {
    /// The component file.
    Module(&'a Path),
    /// A granted file: as written in the config, and resolved.
    Granted(&'a str, &'a Path),
    /// `tls.ca-file`.
    CaFile(&'a Path),
    /// `tls.client-cert`.
    ClientCert(&'a Path),
    /// `tls.client-key`.
    ClientKey(&'a Path),
}

impl InputFile<'_> {
    /// The file's path.
    pub fn path(&self) -> &Path {
        match *self {
            InputFile::Module(p)
            | InputFile::Granted(_, p)
            | InputFile::CaFile(p)
            | InputFile::ClientCert(p)
            | InputFile::ClientKey(p) => p,
        }
    }
}

impl ProviderSpec {
    /// Every file this provider is made from, in one list: what loading reads and
    /// fingerprints, and what the file watcher watches.
    pub fn input_files(&self) -> impl Iterator<Item = InputFile<'_>> {
        let module = match &self.module {
            ModuleSource::File(path) => Some(InputFile::Module(path)),
            ModuleSource::Builtin(_) => None,
        };
        let granted = self
            .grants
            .files
            .iter()
            .map(|(written, path)| InputFile::Granted(written, path));
        let ca = self.tls.ca_file.as_deref().map(InputFile::CaFile);
        let client = self
            .tls
            .client
            .iter()
            .flat_map(|(cert, key)| [InputFile::ClientCert(cert), InputFile::ClientKey(key)]);
        module.into_iter().chain(granted).chain(ca).chain(client)
    }

    /// A module given without configuration (the plugin folder, `wasd check x.wasm`):
    /// its file stem names it; no settings, no grants.
    pub fn unlisted(path: PathBuf) -> ProviderSpec {
        ProviderSpec {
            name: path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            module: ModuleSource::File(path),
            settings: "{}".to_owned(),
            grants: Grants::default(),
            limits: Limits::default(),
            tls: TlsSpec::default(),
            unlisted: true,
            sha256: None,
        }
    }

    /// A standard provider with no settings or grants.
    pub fn builtin(builtin: Builtin) -> ProviderSpec {
        ProviderSpec {
            name: builtin.name().to_owned(),
            module: ModuleSource::Builtin(builtin),
            settings: "{}".to_owned(),
            grants: Grants::default(),
            limits: Limits::default(),
            tls: TlsSpec::default(),
            unlisted: false,
            sha256: None,
        }
    }
}
