//! A gRPC client that dials `discovery:///greeter`, as a Kratos client does: three tonic
//! instances serving the standard health service, found in an appsettings.json (or
//! registered in etcd with `--etcd URL`), calls balanced over them by tonic's channel,
//! then one instance taken out of discovery.
//!
//! ```sh
//! cargo run -p wasd-examples --bin grpc-client
//! ```

use clap::Parser;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use wasd_examples::{Discovery, grpc_instance, tally};

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    discovery: Discovery,
    /// Instances to start.
    #[arg(long, default_value_t = 3)]
    instances: usize,
    /// Calls before and after an instance leaves.
    #[arg(long, default_value_t = 12)]
    calls: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut urls = Vec::new();
    for i in 1..=args.instances {
        urls.push(format!("grpc://{}", grpc_instance(format!("greeter-{i}")).await?));
    }
    let mut discovered = args.discovery.start("greeter", "grpc", &urls).await?;

    let channel = discovered.resolver.grpc_channel("discovery:///greeter").await?;
    let mut client = HealthClient::new(channel);

    let answers = calls(&mut client, args.calls, true).await?;
    println!("answered: {}", tally(&answers));

    let leaving = urls.last().expect("at least one instance");
    discovered.remove(leaving, "grpc://greeter").await?;
    println!("removed {leaving} from discovery");
    // The channel takes the change up on its own tasks, just after the event: wait (at
    // most 2 s) until a round of calls no longer reaches the instance that left.
    let gone = format!("greeter-{}", args.instances);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while calls(&mut client, 20, false).await?.contains(&gone) && std::time::Instant::now() < deadline {}
    let answers = calls(&mut client, args.calls, true).await?;
    println!("answered: {}", tally(&answers));

    discovered.stop().await
}

/// `n` health checks (each printed with `print`); the name of the instance that answered
/// each.
async fn calls(
    client: &mut HealthClient<tonic::transport::Channel>,
    n: usize,
    print: bool,
) -> anyhow::Result<Vec<String>> {
    let mut answered = Vec::new();
    for _ in 0..n {
        let response = client
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await?;
        let instance = response
            .metadata()
            .get("x-instance")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("?")
            .to_owned();
        let status = response.into_inner().status();
        if print {
            println!("Check discovery:///greeter -> {instance}: {status:?}");
        }
        answered.push(instance);
    }
    Ok(answered)
}
