//! Registration: retries with jittered back-off, keep-alives, losing the lease,
//! deregistering.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::timeout;

use super::fake::{FakeRegistrar, ms, secs};
use crate::{
    REGISTRATION_BACKOFF, RegistrarSource, Registration, RegistrationState, ServiceInstance, Source,
};

fn instance() -> ServiceInstance {
    ServiceInstance::new("hello", ["http://10.0.0.1:8000"])
}

/// A registration through `registrar`, which the closure also returns as the one
/// serving now.
fn start(registrar: &Arc<FakeRegistrar>, ttl: Duration) -> Registration {
    let provider: Arc<dyn Source> = registrar.clone();
    let current: RegistrarSource = {
        let provider = provider.clone();
        Arc::new(move || Some(provider.clone()))
    };
    Registration::start(provider, current, instance(), ttl).unwrap()
}

async fn next_state(registration: &mut Registration) -> RegistrationState {
    timeout(secs(120), registration.changed())
        .await
        .expect("no state change in 120 s")
        .expect("the registration ended")
}

/// Whether `d` is within ±20 % of `nominal`.
fn within_20_percent(d: Duration, nominal: Duration) -> bool {
    d >= nominal.mul_f64(0.8) && d <= nominal.mul_f64(1.2)
}

#[tokio::test(start_paused = true)]
async fn registration_retries_with_jittered_backoff_capped_at_30s() {
    let registrar = Arc::new(FakeRegistrar::new("etcd"));
    registrar.fail_registrations(10);
    let mut registration = start(&registrar, secs(15));
    // 0.5 s doubling, capped at 30 s, each ±20 %.
    let nominal = [
        500, 1_000, 2_000, 4_000, 8_000, 16_000, 30_000, 30_000, 30_000, 30_000,
    ]
    .map(ms);
    let mut announced = Vec::new();
    for (i, nominal) in nominal.into_iter().enumerate() {
        match next_state(&mut registration).await {
            RegistrationState::Retrying {
                attempts, retry_in, ..
            } => {
                assert_eq!(attempts as usize, i + 1);
                assert!(
                    within_20_percent(retry_in, nominal),
                    "attempt {attempts}: {retry_in:?} is not {nominal:?} ±20 %"
                );
                announced.push(retry_in);
            }
            other => panic!("attempt {}: {other:?}", i + 1),
        }
    }
    // The 11th attempt succeeds.
    assert_eq!(
        next_state(&mut registration).await,
        RegistrationState::Registered {
            lease: "lease-1".into()
        }
    );
    // Each retry started when announced (the timer fires on the next millisecond).
    let starts: Vec<Duration> = registrar.registers().iter().map(|(at, _)| *at).collect();
    assert_eq!(starts.len(), 11);
    for (gap, retry_in) in starts.windows(2).map(|w| w[1] - w[0]).zip(&announced) {
        assert!(
            gap >= *retry_in && gap <= *retry_in + ms(1),
            "{gap:?} vs {retry_in:?}"
        );
    }
    // The jitter varies the delays (10 draws, all equal only if it is off).
    let capped = &announced[6..];
    assert!(capped.iter().any(|d| *d != capped[0]), "{capped:?}");
    assert_eq!(REGISTRATION_BACKOFF, (ms(500), secs(30)));
}

#[tokio::test(start_paused = true)]
async fn a_lease_is_kept_alive_every_third_of_its_ttl() {
    let registrar = Arc::new(FakeRegistrar::new("etcd"));
    let mut registration = start(&registrar, secs(15));
    assert_eq!(registration.registered().await.unwrap(), "lease-1");
    tokio::time::sleep(ms(31_000)).await;
    assert_eq!(registrar.registers(), [(secs(0), secs(15))]);
    let expected: Vec<_> = [5, 10, 15, 20, 25, 30]
        .map(|t| (secs(t), "lease-1".to_owned()))
        .into();
    assert_eq!(registrar.keep_alives(), expected);
    assert_eq!(
        registration.state(),
        RegistrationState::Registered {
            lease: "lease-1".into()
        }
    );
}

#[tokio::test(start_paused = true)]
async fn a_lost_lease_is_let_go_and_the_instance_registered_again_with_a_fresh_backoff() {
    let registrar = Arc::new(FakeRegistrar::new("etcd"));
    // Two failures first, so that the back-off has moved on before the success.
    registrar.fail_registrations(2);
    let mut registration = start(&registrar, secs(15));
    for attempts in [1, 2] {
        assert!(matches!(
            next_state(&mut registration).await,
            RegistrationState::Retrying { attempts: a, .. } if a == attempts
        ));
    }
    assert_eq!(registration.registered().await.unwrap(), "lease-1");
    let registered_at = registrar.registers()[2].0;
    // The second keep-alive finds the lease gone; the next registration fails once.
    registrar.keep_alive_answers(&[true, false]);
    tokio::time::sleep(ms(9_000)).await;
    registrar.fail_registrations(1);
    let retrying = next_state(&mut registration).await;
    assert_eq!(
        registrar.keep_alives(),
        [
            (registered_at + secs(5), "lease-1".to_owned()),
            (registered_at + secs(10), "lease-1".to_owned())
        ]
    );
    // The lost lease was let go...
    let id = registration.instance().id.clone();
    assert_eq!(registrar.deregisters(), [(id, Some("lease-1".to_owned()))]);
    // ...the failure counts from 1 again, 0.5 s ±20 %...
    match retrying {
        RegistrationState::Retrying {
            attempts, retry_in, ..
        } => {
            assert_eq!(attempts, 1);
            assert!(within_20_percent(retry_in, ms(500)), "{retry_in:?}");
        }
        other => panic!("{other:?}"),
    }
    // ...and the instance is registered under a new lease, kept alive from then on.
    assert_eq!(registration.registered().await.unwrap(), "lease-2");
    tokio::time::sleep(secs(6)).await;
    assert_eq!(registrar.keep_alives().last().unwrap().1, "lease-2");
}

#[tokio::test(start_paused = true)]
async fn deregister_revokes_the_lease_and_stops_the_keep_alives() {
    let registrar = Arc::new(FakeRegistrar::new("etcd"));
    let mut registration = start(&registrar, secs(15));
    assert_eq!(registration.registered().await.unwrap(), "lease-1");
    tokio::time::sleep(ms(7_000)).await;
    assert_eq!(registrar.keep_alives().len(), 1);
    let id = registration.instance().id.clone();
    registration.deregister().await.unwrap();
    assert_eq!(registrar.deregisters(), [(id, Some("lease-1".to_owned()))]);
    tokio::time::sleep(secs(60)).await;
    assert_eq!(registrar.keep_alives().len(), 1);
    assert_eq!(registrar.registers().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn each_step_uses_the_registrar_serving_now() {
    let first = Arc::new(FakeRegistrar::new("etcd"));
    let reloaded = Arc::new(FakeRegistrar::new("etcd"));
    let serving: Arc<std::sync::Mutex<Arc<dyn Source>>> = Arc::new(std::sync::Mutex::new(first.clone()));
    let current: RegistrarSource = {
        let serving = serving.clone();
        Arc::new(move || Some(serving.lock().unwrap().clone()))
    };
    let mut registration = Registration::start(first.clone(), current, instance(), secs(15)).unwrap();
    assert_eq!(registration.registered().await.unwrap(), "lease-1");
    // A reload swaps the registrar; the lease (kept by the host) is kept alive by it.
    *serving.lock().unwrap() = reloaded.clone();
    tokio::time::sleep(ms(5_500)).await;
    assert!(first.keep_alives().is_empty());
    assert_eq!(reloaded.keep_alives(), [(secs(5), "lease-1".to_owned())]);
    registration.deregister().await.unwrap();
    assert!(first.deregisters().is_empty());
    assert_eq!(reloaded.deregisters().len(), 1);
}
