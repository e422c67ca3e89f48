//! Hot reload with real files: plugin modules added, replaced (every way editors and
//! deploy tools write), deleted and corrupted; appsettings.json and wasd.toml edited;
//! resolves running throughout.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use wasd_tests::{Sandbox, fixtures, run, strings};

const A: &str = "http://10.1.0.1:80";
const B: &str = "http://10.1.0.2:80";

fn wasm(path: &str) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

/// Write `bytes` to `path` through a temporary file and a rename, as deploy tools do.
fn write_then_rename(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Resolve until the answer is `expected` (or, for `None`, until there is none).
async fn eventually(resolver: &wasd::Resolver, query: &str, expected: Option<&[&str]>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let now = resolver.resolve(query).await.map(|set| strings(&set)).ok();
        let matched = match (expected, &now) {
            (Some(want), Some(got)) => got == want,
            (None, None) => true,
            _ => false,
        };
        if matched {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{query}: still {now:?}, want {expected:?}; status {:?}",
            resolver.reload_status()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const PLUGINS_ONLY: &str = "pass-through = false\nplugin-dir = \"plugins\"\n";

#[tokio::test(flavor = "multi_thread")]
async fn plugin_modules_are_added_replaced_and_removed_however_written() {
    let sandbox = Sandbox::new();
    std::fs::create_dir(sandbox.path().join("plugins")).unwrap();
    let resolver = sandbox.resolver(PLUGINS_ONLY).await.unwrap();
    assert!(resolver.resolve("fixed").await.is_err());
    let plugin = sandbox.path().join("plugins/fixed.wasm");

    // Added (a plain copy, written in place).
    std::fs::copy(fixtures::FIXED_A, &plugin).unwrap();
    eventually(&resolver, "fixed", Some(&[A])).await;
    assert_eq!(resolver.providers(), ["fixed"]);

    // Replaced in place, in two halves with a pause: the half-written module is never
    // activated, the old one serves meanwhile, and the finished one takes over.
    let b = wasm(fixtures::FIXED_B);
    std::fs::write(&plugin, &b[..b.len() / 2]).unwrap();
    let mut events = resolver.reload_events();
    let report = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let report = events.recv().await.unwrap();
            if !report.errors.is_empty() {
                return report;
            }
        }
    })
    .await
    .expect("the half-written module was looked at");
    assert_eq!(report.errors.len(), 1, "{report:?}");
    assert!(
        report.errors[0].reason.contains("not a loadable component"),
        "{report:?}"
    );
    assert_eq!(strings(&resolver.resolve("fixed").await.unwrap()), [A]);
    let mut file = std::fs::OpenOptions::new().append(true).open(&plugin).unwrap();
    std::io::Write::write_all(&mut file, &b[b.len() / 2..]).unwrap();
    drop(file);
    eventually(&resolver, "fixed", Some(&[B])).await;
    assert!(resolver.reload_status().errors.is_empty());

    // Write-then-rename.
    write_then_rename(&plugin, &wasm(fixtures::FIXED_A));
    eventually(&resolver, "fixed", Some(&[A])).await;

    // Delete-then-create.
    std::fs::remove_file(&plugin).unwrap();
    std::fs::write(&plugin, wasm(fixtures::FIXED_B)).unwrap();
    eventually(&resolver, "fixed", Some(&[B])).await;

    // A Kubernetes ConfigMap: `fixed.wasm -> ..data/fixed.wasm`, `..data -> ..v1`,
    // updated by flipping `..data` to a new folder with one rename.
    std::fs::remove_file(&plugin).unwrap();
    let dir = sandbox.path().join("plugins");
    for (version, bytes) in [
        ("..v1", wasm(fixtures::FIXED_A)),
        ("..v2", wasm(fixtures::FIXED_B)),
    ] {
        std::fs::create_dir(dir.join(version)).unwrap();
        std::fs::write(dir.join(version).join("fixed.wasm"), bytes).unwrap();
    }
    std::os::unix::fs::symlink("..v1", dir.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/fixed.wasm", &plugin).unwrap();
    eventually(&resolver, "fixed", Some(&[A])).await;
    std::os::unix::fs::symlink("..v2", dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    eventually(&resolver, "fixed", Some(&[B])).await;

    // Deleted.
    std::fs::remove_file(&plugin).unwrap();
    eventually(&resolver, "fixed", None).await;
    assert!(resolver.providers().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_module_that_fails_to_load_leaves_the_last_good_one_serving() {
    let sandbox = Sandbox::new();
    let plugin = sandbox.write("plugins/fixed.wasm", wasm(fixtures::FIXED_A));
    let resolver = sandbox.resolver(PLUGINS_ONLY).await.unwrap();
    eventually(&resolver, "fixed", Some(&[A])).await;
    let generation = resolver.reload_status().generation;

    for (bytes, reason) in [
        (b"garbage, not wasm".to_vec(), "not a loadable component"),
        // A core module, not a component.
        (b"\0asm\x01\0\0\0".to_vec(), "not a loadable component"),
        (
            wasm(fixtures::NOT_A_PROVIDER),
            "does not export wasd:provider/resolver@0.1.0",
        ),
        (
            wasm(fixtures::WRONG_VERSION),
            "exports wasd:provider/resolver@9.0.0, a WIT version this host does not support",
        ),
    ] {
        write_then_rename(&plugin, &bytes);
        let report = resolver.reload().await;
        assert_eq!(report.errors.len(), 1, "{report:?}");
        let error = &report.errors[0];
        assert_eq!(error.provider, "fixed");
        assert!(error.source.ends_with("plugins/fixed.wasm"), "{error}");
        assert!(error.reason.contains(reason), "{error}");
        assert!(!report.changed(), "{report:?}");
        assert_eq!(resolver.reload_status().errors, report.errors);
        assert_eq!(resolver.reload_status().generation, generation);
        assert_eq!(strings(&resolver.resolve("fixed").await.unwrap()), [A]);
    }
    // And `wasd check` says the same.
    let out = run(sandbox
        .wasd()
        .args(["check"])
        .env("WASD_CONFIG", sandbox.write("wasd.toml", PLUGINS_ONLY)));
    assert_eq!(out.code, 1, "{}", out.stdout);
    assert!(
        out.stdout.contains("error  fixed")
            && out.stdout.contains("a WIT version this host does not support"),
        "{}",
        out.stdout
    );

    write_then_rename(&plugin, &wasm(fixtures::FIXED_B));
    let report = resolver.reload().await;
    assert!(
        report.errors.is_empty() && report.replaced == ["fixed"],
        "{report:?}"
    );
    eventually(&resolver, "fixed", Some(&[B])).await;
    assert!(resolver.reload_status().generation > generation);
    // Settings the provider refuses in `configure`: the running version stays.
    sandbox.write(
        "wasd.toml",
        format!("{PLUGINS_ONLY}[[provider]]\nname = \"fixed\"\nsettings = {{ refuse = true }}\n"),
    );
    let report = resolver.reload().await;
    assert_eq!(report.errors.len(), 1, "{report:?}");
    assert!(
        report.errors[0]
            .reason
            .contains("invalid settings: refused by request"),
        "{report:?}"
    );
    assert_eq!(strings(&resolver.resolve("fixed").await.unwrap()), [B]);
}

#[tokio::test(flavor = "multi_thread")]
async fn edits_to_appsettings_and_the_host_config_apply_in_place() {
    let sandbox = Sandbox::new();
    let settings = |url: &str| format!(r#"{{"Services": {{"catalog": {{"http": ["{url}"]}}}}}}"#);
    sandbox.write("appsettings.json", settings("http://10.2.0.1:80"));
    let toml = |section: &str| {
        format!(
            "pass-through = false\n[[provider]]\nbuiltin = \"config\"\nsettings = {{ section = \"{section}\" }}\n\
             grants = {{ files = [\"appsettings.json\"] }}\n"
        )
    };
    let resolver = sandbox.resolver(&toml("Services")).await.unwrap();
    let mut watch = resolver.watch("http://catalog").await.unwrap();
    assert_eq!(strings(&watch.current()), ["http://10.2.0.1:80"]);

    // Edited in place: watchers hear of it.
    sandbox.write("appsettings.json", settings("http://10.2.0.2:80"));
    let set = tokio::time::timeout(Duration::from_secs(10), watch.changed())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(strings(&set), ["http://10.2.0.2:80"]);

    // Broken JSON: the provider refuses it, the last good answer stays, nothing is
    // published; the error names the provider and the reason.
    sandbox.write("appsettings.json", r#"{"Services": {"catalog": "#);
    let report = resolver.reload().await;
    assert_eq!(report.errors.len(), 1, "{report:?}");
    assert_eq!(report.errors[0].provider, "config");
    assert!(report.errors[0].reason.contains("appsettings.json"), "{report:?}");
    assert_eq!(
        strings(&resolver.resolve("http://catalog").await.unwrap()),
        ["http://10.2.0.2:80"]
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(500), watch.changed())
            .await
            .is_err()
    );

    // A TOML syntax error in the host config: refused with file:line, nothing changes.
    sandbox.write("wasd.toml", "pass-through = \n");
    let report = resolver.reload().await;
    assert_eq!(report.errors.len(), 1, "{report:?}");
    assert_eq!(report.errors[0].provider, "config");
    assert!(report.errors[0].reason.contains("wasd.toml:1:"), "{report:?}");
    assert_eq!(
        strings(&resolver.resolve("http://catalog").await.unwrap()),
        ["http://10.2.0.2:80"]
    );

    // Fixed, and pointed at another section: the new config serves.
    sandbox.write(
        "appsettings.json",
        r#"{"Services": {"catalog": {"http": ["http://10.2.0.2:80"]}},
           "Other": {"catalog": {"http": ["http://10.2.0.3:80"]}}}"#,
    );
    sandbox.write("wasd.toml", toml("Other"));
    let set = tokio::time::timeout(Duration::from_secs(10), watch.changed())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(strings(&set), ["http://10.2.0.3:80"]);
    assert!(resolver.reload_status().errors.is_empty());
}

/// What the resolve loops of `no_resolve_fails_during_hundreds_of_reloads` saw, per kind.
#[derive(Default)]
struct Tally {
    /// Resolves per kind: cached texts, uncached (the chain runs every time), and new
    /// texts (a new entry each, its first resolve through the chain).
    cached: AtomicUsize,
    uncached: AtomicUsize,
    new_texts: AtomicUsize,
    failures: AtomicUsize,
    wrong: AtomicUsize,
    examples: std::sync::Mutex<Vec<String>>,
}

impl Tally {
    fn check(&self, kind: &AtomicUsize, result: Result<wasd::EndpointSet, wasd::Error>, allowed: [&str; 2]) {
        kind.fetch_add(1, Ordering::Relaxed);
        let problem = match result {
            Ok(set) if allowed.iter().any(|a| strings(&set) == [*a]) => return,
            Ok(set) => {
                self.wrong.fetch_add(1, Ordering::Relaxed);
                format!("a wrong answer: {:?}", strings(&set))
            }
            Err(e) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                format!("a failure: {e}")
            }
        };
        let mut examples = self.examples.lock().unwrap();
        if examples.len() < 5 {
            examples.push(problem);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn no_resolve_fails_during_hundreds_of_reloads() {
    const C: &str = "http://10.1.0.3:80";
    const D: &str = "http://10.1.0.4:80";
    let sandbox = Sandbox::new();
    let plugin = sandbox.write("modules/fixed.wasm", wasm(fixtures::FIXED_A));
    // `fixed` answers the service `fixed` (A or B, by module); `any` every other
    // service (C or D, by its settings in the config).
    let toml = |answer: &str| {
        format!(
            r#"pass-through = false
[[provider]]
name = "fixed"
module = "{}"
[[provider]]
name = "any"
module = "{}"
settings = {{ service = "*", answers = [{{ endpoints = ["{answer}"] }}] }}
"#,
            plugin.display(),
            fixtures::SEQUENCE
        )
    };
    let resolver = sandbox.resolver(&toml(C)).await.unwrap();
    eventually(&resolver, "fixed", Some(&[A])).await;
    let (a, b) = (wasm(fixtures::FIXED_A), wasm(fixtures::FIXED_B));

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let mut tasks = Vec::new();
    for task in 0..4 {
        let (resolver, stop, tally) = (resolver.clone(), stop.clone(), tally.clone());
        tasks.push(tokio::spawn(async move {
            let fixed = wasd::Query::parse("fixed").unwrap();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                tally.check(&tally.cached, resolver.resolve("fixed").await, [A, B]);
                tally.check(&tally.cached, resolver.resolve("http://other").await, [C, D]);
                tally.check(&tally.uncached, resolver.resolve_uncached(&fixed).await, [A, B]);
                n += 1;
                let text = format!("http://new-{task}-{n}");
                tally.check(&tally.new_texts, resolver.resolve(&text).await, [C, D]);
                tokio::task::yield_now().await;
            }
        }));
    }
    let before = resolver.reload_status();
    // At least 120 reloads in cycles of six: a module swap, a broken config, a config
    // edit that repairs it and changes an answer, a broken module, a module swap that
    // repairs it, another config edit. The broken ones are refused and change nothing.
    // Reloads go on (whole cycles) until enough resolves ran among them, however busy
    // the machine: what is counted is resolves during reloads, not the machine's speed.
    let config = sandbox.path().join("wasd.toml");
    let enough = || {
        tally.cached.load(Ordering::Relaxed) >= 200
            && tally.uncached.load(Ordering::Relaxed) >= 100
            && tally.new_texts.load(Ordering::Relaxed) >= 100
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let mut i = 0u32;
    while i < 120 || !i.is_multiple_of(6) || !enough() {
        assert!(
            std::time::Instant::now() < deadline,
            "still too few resolves after {i} reloads"
        );
        match i % 6 {
            0 => write_then_rename(&plugin, &b),
            1 => write_then_rename(&config, b"[[provider]\nmodule = "),
            2 => write_then_rename(&config, toml(D).as_bytes()),
            3 => write_then_rename(&plugin, b"\0asm not really"),
            4 => write_then_rename(&plugin, &a),
            _ => write_then_rename(&config, toml(C).as_bytes()),
        }
        let report = resolver.reload().await;
        let refused = matches!(i % 6, 1 | 3);
        assert_eq!(!report.errors.is_empty(), refused, "reload {i}: {report:?}");
        i += 1;
    }
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    let after = resolver.reload_status();
    let (cached, uncached, new_texts) = (
        tally.cached.load(Ordering::Relaxed),
        tally.uncached.load(Ordering::Relaxed),
        tally.new_texts.load(Ordering::Relaxed),
    );
    eprintln!(
        "{} reloads ({} new chains): {cached} cached, {uncached} uncached and {new_texts} new-text resolves",
        after.reloads - before.reloads,
        after.generation - before.generation,
    );
    assert!(after.reloads - before.reloads >= 120, "{after:?}");
    // Module swaps and repairs made new chains (config edits change the `any`
    // provider's settings: new chains too).
    assert!(after.generation - before.generation >= 60, "{after:?}");
    assert_eq!(
        (
            tally.failures.load(Ordering::Relaxed),
            tally.wrong.load(Ordering::Relaxed)
        ),
        (0, 0),
        "{:?}",
        tally.examples.lock().unwrap()
    );
    assert!(
        cached >= 200 && uncached >= 100 && new_texts >= 100,
        "{cached} {uncached} {new_texts}"
    );
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[tokio::test(flavor = "multi_thread")]
async fn old_generations_are_freed() {
    let sandbox = Sandbox::new();
    let plugin = sandbox.write("plugins/fixed.wasm", wasm(fixtures::FIXED_A));
    let resolver = sandbox.resolver(PLUGINS_ONLY).await.unwrap();
    let (a, b) = (wasm(fixtures::FIXED_A), wasm(fixtures::FIXED_B));
    let cycle = |i: usize| {
        write_then_rename(&plugin, if i.is_multiple_of(2) { &b } else { &a });
    };
    // Warm up: both modules compiled and cached, allocator pools grown.
    for i in 0..40 {
        cycle(i);
        resolver.reload().await;
        resolver.resolve("fixed").await.unwrap();
    }
    let before = rss_bytes();
    for i in 0..400 {
        cycle(i);
        resolver.reload().await;
        resolver.resolve("fixed").await.unwrap();
    }
    // Nothing holds a replaced provider once its calls are done.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while resolver.reload_status().draining > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            resolver.reload_status()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let grown = rss_bytes().saturating_sub(before);
    assert!(grown < 48 << 20, "RSS grew {} MiB over 400 reloads", grown >> 20);
}

#[test]
fn wasd_watch_prints_the_change_after_a_file_edit() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "appsettings.json",
        r#"{"Services": {"catalog": {"http": ["http://10.3.0.1:80"]}}}"#,
    );
    let mut child = sandbox
        .wasd()
        .args(["watch", "http://catalog"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = wasd_tests::Lines::new(child.stdout.take().unwrap());
    let line = stdout.next(Duration::from_secs(30), "the current set");
    assert_eq!(line.trim(), "http://10.3.0.1:80");

    // The first line comes after the file watcher is armed: the edit is seen.
    let path = sandbox.path().join("appsettings.json");
    write_then_rename(
        &path,
        br#"{"Services": {"catalog": {"http": ["http://10.3.0.2:80", "http://10.3.0.3:80"]}}}"#,
    );
    let line = stdout.next(Duration::from_secs(10), "the change");
    assert_eq!(line.trim(), "http://10.3.0.2:80 http://10.3.0.3:80");
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_listed_module_that_does_not_exist_yet_joins_when_it_appears() {
    let sandbox = Sandbox::new();
    let module = sandbox.path().join("modules/fixed.wasm");
    let toml = format!(
        "pass-through = false\n[[provider]]\nname = \"fixed\"\nmodule = \"{}\"\n",
        module.display()
    );
    // A long-running resolver (it watches files) starts without it, and says why.
    let resolver = sandbox
        .resolver(&toml)
        .await
        .expect("a missing module stops the start");
    // It holds its place: queries fail naming it, nothing later answers in its place.
    assert_eq!(resolver.providers(), ["fixed"]);
    let err = resolver.resolve("fixed").await.unwrap_err().to_string();
    assert!(
        err.contains("provider 'fixed': upstream unavailable: its module")
            && err.contains("does not exist yet"),
        "{err}"
    );
    let status = resolver.reload_status();
    assert_eq!(status.errors.len(), 1, "{status:?}");
    assert!(
        status.errors[0].reason.contains("does not exist yet"),
        "{status:?}"
    );
    // The file appears (its folder too): the provider joins and answers.
    std::fs::create_dir_all(module.parent().unwrap()).unwrap();
    write_then_rename(&module, &wasm(fixtures::FIXED_A));
    eventually(&resolver, "fixed", Some(&[A])).await;
    assert_eq!(resolver.providers(), ["fixed"]);
    assert!(resolver.reload_status().errors.is_empty());

    // A one-shot command cannot wait for it: `wasd resolve` fails naming the file.
    let missing = toml.replace("modules/fixed.wasm", "modules/other.wasm");
    sandbox.write("wasd.toml", missing);
    let out = run(sandbox.wasd().args(["resolve", "fixed", "--config", "wasd.toml"]));
    assert_ne!(out.code, 0, "{}", out.stdout);
    assert!(out.stderr.contains("cannot read the module"), "{}", out.stderr);
}
