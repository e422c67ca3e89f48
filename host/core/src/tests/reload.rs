//! Reload orchestration: keep what is unchanged, load what changed, keep the previous
//! version of what fails, and wake the cache.

use std::sync::{Arc, Mutex};

use tokio::time::{Instant, timeout};

use super::fake::{Fake, answer, bare, secs, set};
use crate::{Cache, Chain, ChainCell, Clock, Planned, ReloadError, Reloader, Settings, Source};

const FP_A: [u8; 32] = [1; 32];
const FP_B: [u8; 32] = [2; 32];
const FP_B2: [u8; 32] = [3; 32];

fn cell_of(sources: &[&Arc<Fake>]) -> Arc<ChainCell> {
    let chain = Chain::new(sources.iter().map(|s| Arc::clone(s) as Arc<dyn Source>).collect());
    Arc::new(ChainCell::new(chain))
}

fn planned(name: &str, fingerprint: [u8; 32]) -> Result<Planned<String>, ReloadError> {
    Ok(Planned::new(
        name,
        format!("{name}.wasm"),
        fingerprint,
        format!("{name}-input"),
    ))
}

/// A loader that records the inputs it is given and answers from `results`, in order.
struct Loader {
    inputs: Mutex<Vec<String>>,
    results: Mutex<Vec<Result<Arc<dyn Source>, String>>>,
}

impl Loader {
    fn new(results: Vec<Result<Arc<dyn Source>, String>>) -> Arc<Loader> {
        Arc::new(Loader {
            inputs: Mutex::new(Vec::new()),
            results: Mutex::new(results),
        })
    }

    fn load(self: &Arc<Self>) -> impl Fn(String) -> std::future::Ready<Result<Arc<dyn Source>, String>> {
        let this = self.clone();
        move |input| {
            let mut results = this.results.lock().unwrap();
            let result = if results.is_empty() {
                Err(format!("unexpected load of {input}"))
            } else {
                results.remove(0)
            };
            this.inputs.lock().unwrap().push(input);
            std::future::ready(result)
        }
    }

    fn inputs(&self) -> Vec<String> {
        self.inputs.lock().unwrap().clone()
    }
}

fn serving(cell: &ChainCell) -> Vec<Arc<dyn Source>> {
    cell.load().sources().to_vec()
}

fn same(a: &Arc<dyn Source>, b: &Arc<Fake>) -> bool {
    std::ptr::addr_eq(Arc::as_ptr(a), Arc::as_ptr(b))
}

#[tokio::test(start_paused = true)]
async fn an_unchanged_source_is_kept_and_a_changed_one_loaded() {
    let a = Arc::new(Fake::new("a").with_fingerprint(FP_A));
    let b = Arc::new(Fake::new("b").with_fingerprint(FP_B));
    let cell = cell_of(&[&a, &b]);
    let reloader = Reloader::new(cell.clone(), Vec::new());
    let b2 = Arc::new(Fake::new("b").with_fingerprint(FP_B2));
    let loader = Loader::new(vec![Ok(b2.clone())]);
    let report = reloader
        .reload(Ok(vec![planned("a", FP_A), planned("b", FP_B2)]), loader.load())
        .await;
    // Only b was loaded...
    assert_eq!(loader.inputs(), ["b-input"]);
    assert_eq!(report.replaced, ["b"]);
    assert!(report.added.is_empty() && report.removed.is_empty() && report.errors.is_empty());
    // ...a is the very same source, b the new one...
    let now = serving(&cell);
    assert_eq!(now.len(), 2);
    assert!(same(&now[0], &a), "a was not kept");
    assert!(same(&now[1], &b2), "b was not replaced");
    // ...and the chain moved to generation 1.
    assert_eq!(report.generation, 1);
    assert_eq!(cell.generation(), 1);
    assert_eq!(reloader.status().generation, 1);
    // The same plan again changes nothing.
    let again = reloader
        .reload(Ok(vec![planned("a", FP_A), planned("b", FP_B2)]), loader.load())
        .await;
    assert!(!again.changed());
    assert_eq!(cell.generation(), 1);
    assert_eq!(loader.inputs().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_reload_wakes_the_cache_which_re_resolves_on_the_new_chain() {
    let start = Instant::now();
    let a = Arc::new(
        Fake::new("a")
            .answering(answer(&[bare("10.0.0.1")]).with_ttl(secs(60)))
            .with_fingerprint(FP_A),
    );
    let cell = cell_of(&[&a]);
    let cache = Cache::new(cell.clone(), Settings::default(), Clock::exact());
    let mut watch = cache.watch("svc").await.unwrap();
    tokio::time::sleep(secs(5)).await;
    let a2 = Arc::new(
        Fake::new("a")
            .answering(answer(&[bare("10.0.0.2")]).with_ttl(secs(60)))
            .with_fingerprint(FP_B),
    );
    let loader = Loader::new(vec![Ok(a2.clone())]);
    let reloader = Reloader::new(cell.clone(), Vec::new());
    let report = reloader.reload(Ok(vec![planned("a", FP_B)]), loader.load()).await;
    assert_eq!(report.generation, 1);
    // The watcher hears of the new set right away, well before the TTL (60 s).
    let changed = timeout(secs(30), watch.changed()).await.expect("not re-resolved");
    assert_eq!(changed, Some(set("a", &[bare("10.0.0.2")])));
    assert_eq!(start.elapsed(), secs(5));
    assert_eq!(a.calls(), 1);
    assert_eq!(a2.calls(), 1);
    assert_eq!(cache.resolve("svc").await.unwrap(), set("a", &[bare("10.0.0.2")]));
}

#[tokio::test(start_paused = true)]
async fn a_failed_load_keeps_the_previous_version_and_is_not_retried_while_unchanged() {
    let a = Arc::new(Fake::new("a").with_fingerprint(FP_A));
    let b = Arc::new(Fake::new("b").with_fingerprint(FP_B));
    let cell = cell_of(&[&a, &b]);
    let reloader = Reloader::new(cell.clone(), Vec::new());
    let loader = Loader::new(vec![Err("bad module".into())]);
    let plan = || Ok(vec![planned("a", FP_A), planned("b", FP_B2)]);
    let report = reloader.reload(plan(), loader.load()).await;
    let error = ReloadError::new("b", "b.wasm", "bad module");
    // Reported...
    assert_eq!(report.errors, std::slice::from_ref(&error));
    assert_eq!(reloader.status().errors, std::slice::from_ref(&error));
    // ...while the previous b keeps serving, in a chain that did not change.
    assert!(!report.changed());
    assert_eq!(report.generation, 0);
    assert_eq!(cell.generation(), 0);
    let now = serving(&cell);
    assert!(now.len() == 2 && same(&now[0], &a) && same(&now[1], &b));
    assert_eq!(loader.inputs(), ["b-input"]);
    // The same broken input is not loaded again, and still reported.
    let report = reloader.reload(plan(), loader.load()).await;
    assert_eq!(loader.inputs(), ["b-input"]);
    assert_eq!(report.errors, [error]);
    assert_eq!(cell.generation(), 0);
    assert!(same(&serving(&cell)[1], &b));
}

#[tokio::test(start_paused = true)]
async fn a_plan_that_cannot_be_read_changes_nothing() {
    let a = Arc::new(Fake::new("a").with_fingerprint(FP_A));
    let cell = cell_of(&[&a]);
    let reloader = Reloader::new(cell.clone(), Vec::new());
    let loader = Loader::new(Vec::new());
    let error = ReloadError::new("config", "wasd.toml", "line 3: expected '='");
    let report = reloader
        .reload::<String, _, _>(Err(error.clone()), loader.load())
        .await;
    assert_eq!(report.errors, [error]);
    assert!(!report.changed());
    assert_eq!(report.generation, 0);
    assert_eq!(cell.generation(), 0);
    assert!(loader.inputs().is_empty());
    let now = serving(&cell);
    assert!(now.len() == 1 && same(&now[0], &a));
    assert_eq!(reloader.status().providers, ["a"]);
}
