//! The plugin boundary itself, with wasmtime driven directly (docs/BENCHMARKS.md rows 5
//! and 8):
//!
//! - `instantiate`: a provider component from its `InstancePre`, with the on-demand
//!   allocator (the host's) and with the pooling allocator;
//! - `call`: one `resolve` answering one endpoint, as a component call (canonical ABI:
//!   typed lowering and lifting of records, strings, options and lists) vs the
//!   alternative plugin design, a core module called with bytes copied through its
//!   linear memory (raw bytes, and JSON as Extism-style plugins exchange), and vs the
//!   same component call made through the host (`resolve_uncached`: pool checkout,
//!   permit, deadline, answer checks);
//! - `languages`: the same provider (examples/providers/) built from Rust, Python and
//!   JavaScript: instantiation and a resolve through the host; module size and cold
//!   compile time are printed.
//!
//! `cargo bench -p wasd-tests --bench boundary`

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use serde::{Deserialize, Serialize};
use wasd_tests::{Sandbox, example_provider, fixtures};
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, Module, PoolingAllocationConfig, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

wasmtime::component::bindgen!({
    path: "../wit",
    world: "provider",
    exports: { default: async },
});

use exports::wasd::provider::resolver::Query;

/// The same world with synchronous exports: a call without the fiber the host's async
/// calls run on (the host needs async for its deadlines; this row shows what it costs).
mod sync_bindings {
    wasmtime::component::bindgen!({ path: "../wit", world: "provider" });
}

struct State {
    wasi: WasiCtx,
    table: ResourceTable,
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

fn new_store(engine: &Engine) -> Store<State> {
    let mut store = Store::new(
        engine,
        State {
            wasi: WasiCtx::builder().build(),
            table: ResourceTable::new(),
        },
    );
    store.set_epoch_deadline(u64::MAX / 2);
    store
}

/// The host's engine settings, optionally with the pooling allocator.
fn engine(pooling: bool) -> Engine {
    let mut config = Config::new();
    config.epoch_interruption(true);
    config.cranelift_opt_level(wasmtime::OptLevel::Speed);
    if pooling {
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(64)
            .total_core_instances(64 * 8)
            .total_memories(64)
            .total_tables(64 * 2)
            .max_memory_size(64 << 20);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    }
    Engine::new(&config).unwrap()
}

// The wasd imports, answering nothing (the fixture never calls them), for both
// generated bindings.
macro_rules! no_imports {
    ($($p:ident)::+) => {
        impl $($p)::+::types::Host for State {}

        impl $($p)::+::log::Host for State {
            fn log(&mut self, _: $($p)::+::log::Level, _: String) {}
        }

        impl $($p)::+::dns::Host for State {
            fn lookup_srv(&mut self, _: String) -> Result<Vec<$($p)::+::dns::SrvRecord>, $($p)::+::dns::DnsError> {
                Err($($p)::+::dns::DnsError::NotFound)
            }
            fn lookup_addresses(&mut self, _: String) -> Result<$($p)::+::dns::AddressAnswer, $($p)::+::dns::DnsError> {
                Err($($p)::+::dns::DnsError::NotFound)
            }
            fn kubernetes_suffix(&mut self) -> Option<String> {
                None
            }
        }
    };
}
no_imports!(wasd::provider);
no_imports!(sync_bindings::wasd::provider);

/// The `fixed-a` fixture (answers `fixed` with `http://10.1.0.1:80`), linked with
/// WASI and the wasd imports.
fn fixed_component(engine: &Engine) -> wasmtime::component::InstancePre<State> {
    let component = Component::from_file(engine, fixtures::FIXED_A).unwrap();
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker).unwrap();
    Provider::add_to_linker::<_, HasSelf<State>>(&mut linker, |s| s).unwrap();
    linker.instantiate_pre(&component).unwrap()
}

fn query() -> Query {
    Query {
        service: "fixed".into(),
        endpoint_name: None,
        schemes: vec![],
        port: None,
    }
}

fn instantiate(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let mut group = c.benchmark_group("instantiate");
    for (label, pooling) in [("on_demand", false), ("pooling", true)] {
        let engine = engine(pooling);
        let pre = fixed_component(&engine);
        group.bench_function(label, |b| {
            b.to_async(&rt).iter(|| async {
                let mut store = new_store(&engine);
                let instance = pre.instantiate_async(&mut store).await.unwrap();
                black_box((store, instance))
            })
        });
    }
    group.finish();
}

// The core-module plugin: `alloc` hands out input space, `resolve(ptr, len)` compares
// the query with "fixed" and returns the answer's (ptr << 32 | len), or 0. The answer is
// precomputed in a data segment: only the boundary is measured, as in the component.
const CORE_WAT: &str = r#"
(module
  (memory (export "memory") 1)
  (data (i32.const 0) "fixed")
  (data (i32.const 64) "$RAW")
  (data (i32.const 1024) "$JSON")
  (func (export "alloc") (param $len i32) (result i32) (i32.const 4096))
  (func $is_fixed (param $ptr i32) (param $len i32) (result i32)
    (local $i i32)
    (if (i32.ne (local.get $len) (i32.const 5)) (then (return (i32.const 0))))
    (block $done
      (loop $next
        (br_if $done (i32.eq (local.get $i) (i32.const 5)))
        (if (i32.ne (i32.load8_u (i32.add (local.get $ptr) (local.get $i)))
                    (i32.load8_u (local.get $i)))
          (then (return (i32.const 0))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (i32.const 1))
  (func (export "resolve_raw") (param $ptr i32) (param $len i32) (result i64)
    (if (result i64) (call $is_fixed (local.get $ptr) (local.get $len))
      (then (i64.or (i64.shl (i64.const 64) (i64.const 32)) (i64.const $RAW_LEN)))
      (else (i64.const 0))))
  ;; The JSON query is {"service":"fixed",...}: the name starts 12 bytes in.
  (func (export "resolve_json") (param $ptr i32) (param $len i32) (result i64)
    (if (result i64) (call $is_fixed (i32.add (local.get $ptr) (i32.const 12)) (i32.const 5))
      (then (i64.or (i64.shl (i64.const 1024) (i64.const 32)) (i64.const $JSON_LEN)))
      (else (i64.const 0))))
)
"#;

/// The raw answer: scheme, host, then the port as two bytes, each string length-prefixed.
fn raw_answer() -> Vec<u8> {
    let mut out = Vec::new();
    for s in ["http", "10.1.0.1"] {
        out.push(s.len() as u8);
        out.extend_from_slice(s.as_bytes());
    }
    out.extend_from_slice(&80u16.to_le_bytes());
    out
}

#[derive(Serialize)]
struct JsonQuery<'a> {
    service: &'a str,
    endpoint_name: Option<&'a str>,
    schemes: &'a [String],
    port: Option<u16>,
}

#[derive(Serialize, Deserialize)]
struct JsonEndpoint {
    scheme: Option<String>,
    host: String,
    port: Option<u16>,
    path: Option<String>,
    metadata: Vec<(String, String)>,
}

#[derive(Serialize, Deserialize)]
struct JsonResolution {
    endpoints: Vec<JsonEndpoint>,
    ttl_ms: Option<u64>,
    version: Option<String>,
}

fn json_answer() -> String {
    serde_json::to_string(&JsonResolution {
        endpoints: vec![JsonEndpoint {
            scheme: Some("http".into()),
            host: "10.1.0.1".into(),
            port: Some(80),
            path: None,
            metadata: vec![],
        }],
        ttl_ms: None,
        version: None,
    })
    .unwrap()
}

/// Escape bytes for a WAT string literal.
fn wat_bytes(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("\\{b:02x}")).collect()
}

struct CorePlugin {
    store: Store<()>,
    memory: wasmtime::Memory,
    alloc: wasmtime::TypedFunc<i32, i32>,
    raw: wasmtime::TypedFunc<(i32, i32), i64>,
    json: wasmtime::TypedFunc<(i32, i32), i64>,
}

impl CorePlugin {
    fn new(engine: &Engine) -> CorePlugin {
        let (raw, json) = (raw_answer(), json_answer());
        let wat = CORE_WAT
            .replace("$RAW_LEN", &raw.len().to_string())
            .replace("$JSON_LEN", &json.len().to_string())
            .replace("$RAW", &wat_bytes(&raw))
            .replace("$JSON", &wat_bytes(json.as_bytes()));
        let module = Module::new(engine, wat::parse_str(wat).unwrap()).unwrap();
        let mut store = Store::new(engine, ());
        store.set_epoch_deadline(u64::MAX / 2);
        let instance = wasmtime::Instance::new(&mut store, &module, &[]).unwrap();
        CorePlugin {
            memory: instance.get_memory(&mut store, "memory").unwrap(),
            alloc: instance.get_typed_func(&mut store, "alloc").unwrap(),
            raw: instance.get_typed_func(&mut store, "resolve_raw").unwrap(),
            json: instance.get_typed_func(&mut store, "resolve_json").unwrap(),
            store,
        }
    }

    /// Copy `input` in, call, copy the answer out.
    fn call(&mut self, raw: bool, input: &[u8]) -> Vec<u8> {
        let ptr = self.alloc.call(&mut self.store, input.len() as i32).unwrap();
        self.memory.write(&mut self.store, ptr as usize, input).unwrap();
        let f = if raw { &self.raw } else { &self.json };
        let packed = f.call(&mut self.store, (ptr, input.len() as i32)).unwrap() as u64;
        self.answer(packed)
    }

    /// The same, with both calls made as the host makes them: async, on a fiber.
    async fn call_async(&mut self, input: &[u8]) -> Vec<u8> {
        let ptr = self
            .alloc
            .call_async(&mut self.store, input.len() as i32)
            .await
            .unwrap();
        self.memory.write(&mut self.store, ptr as usize, input).unwrap();
        let packed = self
            .raw
            .call_async(&mut self.store, (ptr, input.len() as i32))
            .await
            .unwrap() as u64;
        self.answer(packed)
    }

    fn answer(&mut self, packed: u64) -> Vec<u8> {
        let (at, len) = ((packed >> 32) as usize, (packed & 0xffff_ffff) as usize);
        let mut out = vec![0; len];
        self.memory.read(&self.store, at, &mut out).unwrap();
        out
    }
}

/// Decode the raw answer into an endpoint, as the host would.
fn decode_raw(bytes: &[u8]) -> JsonEndpoint {
    let mut at = 0;
    let mut string = || {
        let len = bytes[at] as usize;
        let s = String::from_utf8(bytes[at + 1..at + 1 + len].to_vec()).unwrap();
        at += 1 + len;
        s
    };
    let (scheme, host) = (string(), string());
    let port = u16::from_le_bytes([bytes[bytes.len() - 2], bytes[bytes.len() - 1]]);
    JsonEndpoint {
        scheme: Some(scheme),
        host,
        port: Some(port),
        path: None,
        metadata: vec![],
    }
}

fn call(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let engine = engine(false);
    let mut group = c.benchmark_group("call");

    // The component, called directly: lower the query, run, lift the answer.
    let pre = fixed_component(&engine);
    let mut store = new_store(&engine);
    let provider = rt.block_on(async {
        let instance = pre.instantiate_async(&mut store).await.unwrap();
        Provider::new(&mut store, &instance).unwrap()
    });
    let resolver = provider.wasd_provider_resolver();
    let configuration = exports::wasd::provider::resolver::Configuration {
        name: "fixed".into(),
        settings: "{}".into(),
        files: vec![],
    };
    rt.block_on(resolver.call_configure(&mut store, &configuration))
        .unwrap()
        .unwrap();
    let q = query();
    let answer = rt
        .block_on(resolver.call_resolve(&mut store, &q))
        .unwrap()
        .unwrap();
    assert_eq!(answer.endpoints[0].host, "10.1.0.1");
    group.bench_function("component_direct", |b| {
        b.iter(|| {
            black_box(
                rt.block_on(resolver.call_resolve(&mut store, black_box(&q)))
                    .unwrap()
                    .unwrap(),
            )
        })
    });

    // The same component and call, synchronous (no fiber).
    let mut linker = Linker::new(&engine);
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker).unwrap();
    sync_bindings::Provider::add_to_linker::<_, HasSelf<State>>(&mut linker, |s| s).unwrap();
    let component = Component::from_file(&engine, fixtures::FIXED_A).unwrap();
    let mut sync_store = new_store(&engine);
    let sync_provider = sync_bindings::Provider::instantiate(&mut sync_store, &component, &linker).unwrap();
    let sync_resolver = sync_provider.wasd_provider_resolver();
    let sync_configuration = sync_bindings::exports::wasd::provider::resolver::Configuration {
        name: "fixed".into(),
        settings: "{}".into(),
        files: vec![],
    };
    sync_resolver
        .call_configure(&mut sync_store, &sync_configuration)
        .unwrap()
        .unwrap();
    let sync_query = sync_bindings::exports::wasd::provider::resolver::Query {
        service: "fixed".into(),
        endpoint_name: None,
        schemes: vec![],
        port: None,
    };
    group.bench_function("component_direct_sync", |b| {
        b.iter(|| {
            black_box(
                sync_resolver
                    .call_resolve(&mut sync_store, black_box(&sync_query))
                    .unwrap()
                    .unwrap(),
            )
        })
    });

    // The core module with bytes through linear memory.
    let mut core = CorePlugin::new(&engine);
    assert_eq!(decode_raw(&core.call(true, b"fixed")).host, "10.1.0.1");
    group.bench_function("core_module_raw_bytes", |b| {
        b.iter(|| black_box(decode_raw(&core.call(true, black_box(b"fixed")))))
    });
    group.bench_function("core_module_raw_bytes_async", |b| {
        b.iter(|| black_box(decode_raw(&rt.block_on(core.call_async(black_box(b"fixed"))))))
    });
    group.bench_function("core_module_json", |b| {
        b.iter(|| {
            let input = serde_json::to_vec(&JsonQuery {
                service: black_box("fixed"),
                endpoint_name: None,
                schemes: &[],
                port: None,
            })
            .unwrap();
            let out = core.call(false, &input);
            black_box(serde_json::from_slice::<JsonResolution>(&out).unwrap())
        })
    });

    // The same component call through the host, with everything around it.
    let sandbox = Sandbox::new();
    sandbox.write("plugins/fixed.wasm", std::fs::read(fixtures::FIXED_A).unwrap());
    let host = rt
        .block_on(sandbox.resolver("pass-through = false\nplugin-dir = \"plugins\"\n"))
        .unwrap();
    let parsed = ::wasd::Query::parse("fixed").unwrap();
    group.bench_function("component_through_host", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(host.resolve_uncached(&parsed).await.unwrap()) })
    });
    group.finish();
}

fn languages(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let engine = engine(false);
    let mut group = c.benchmark_group("languages");
    for language in ["rust", "python", "javascript"] {
        let module = example_provider(language);
        let bytes = std::fs::read(&module).unwrap();
        let start = std::time::Instant::now();
        let component = Component::new(&engine, &bytes).unwrap();
        eprintln!(
            "languages/{language}: module {:.1} KiB, cold compile {:.2} s",
            bytes.len() as f64 / 1024.0,
            start.elapsed().as_secs_f64()
        );
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).unwrap();
        Provider::add_to_linker::<_, HasSelf<State>>(&mut linker, |s| s).unwrap();
        let pre = linker.instantiate_pre(&component).unwrap();
        group.bench_function(format!("instantiate/{language}"), |b| {
            b.to_async(&rt).iter(|| async {
                let mut store = new_store(&engine);
                let instance = pre.instantiate_async(&mut store).await.unwrap();
                black_box((store, instance))
            })
        });
        // A resolve through the host: the standard table, two endpoints back.
        let sandbox = Sandbox::new();
        let toml = format!(
            "pass-through = false\n[[provider]]\nname = \"table\"\nmodule = {:?}\nsettings = {{ {} }}\n",
            module.display().to_string(),
            wasd_tests::conformance::TABLE
        );
        let host = rt.block_on(sandbox.resolver(&toml)).unwrap();
        let query = ::wasd::Query::parse("basket").unwrap();
        assert_eq!(rt.block_on(host.resolve_uncached(&query)).unwrap().len(), 2);
        group.bench_function(format!("resolve_through_host/{language}"), |b| {
            b.to_async(&rt)
                .iter(|| async { black_box(host.resolve_uncached(&query).await.unwrap()) })
        });
    }
    group.finish();
}

criterion_group!(benches, instantiate, call, languages);
criterion_main!(benches);
