//! A gRPC client that dials `discovery:///greeter`, as a Kratos client does: three tonic
//! instances serving the standard health service, found in an appsettings.json (or
//! registered in etcd with `--etcd URL`), calls balanced over them by tonic's channel
//! (or, with `--balanced`, by wasd under the query's policy: round-robin), then one
//! instance taken out of discovery.
//!
//! ```sh
//! cargo run -p wasd-examples --bin grpc-client [-- --balanced]
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
    /// wasd picks each call's instance (`Resolver::grpc_balanced_channel`), and a
    /// failed call counts against the instance it went to.
    #[arg(long)]
    balanced: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut urls = Vec::new();
    for i in 1..=args.instances {
        urls.push(format!("grpc://{}", grpc_instance(format!("greeter-{i}")).await?));
    }
    let mut discovered = args.discovery.start("greeter", "grpc", &urls).await?;

    if args.balanced {
        let channel = discovered
            .resolver
            .grpc_balanced_channel("discovery:///greeter")
            .await?;
        run(&mut discovered, HealthClient::new(channel), &args, &urls).await?;
    } else {
        let channel = discovered.resolver.grpc_channel("discovery:///greeter").await?;
        run(&mut discovered, HealthClient::new(channel), &args, &urls).await?;
    }
    discovered.stop().await
}

/// Calls, an instance taken out of discovery, calls again.
async fn run<T: Service>(
    discovered: &mut wasd_examples::Discovered,
    mut client: HealthClient<T>,
    args: &Args,
    urls: &[String],
) -> anyhow::Result<()> {
    let answers = calls(&mut client, args.calls, true).await?;
    println!("answered: {}", tally(&answers));

    let leaving = urls.last().expect("at least one instance");
    discovered.remove(leaving, "grpc://greeter").await?;
    println!("removed {leaving} from discovery");
    // The channel takes the change up just after the event (tonic's on its own tasks,
    // wasd's at the next pick): wait (at most 2 s) until a round of calls no longer
    // reaches the instance that left.
    let gone = format!("greeter-{}", args.instances);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while calls(&mut client, 20, false).await?.contains(&gone) && std::time::Instant::now() < deadline {}
    let answers = calls(&mut client, args.calls, true).await?;
    println!("answered: {}", tally(&answers));
    Ok(())
}

/// What a generated client needs of its channel: tonic's `Channel`, or wasd's
/// `BalancedChannel`.
trait Service:
    tonic::client::GrpcService<
        tonic::body::Body,
        Error: Into<tonic::codegen::StdError>,
        ResponseBody: tonic::codegen::Body<
            Data = tonic::codegen::Bytes,
            Error: Into<tonic::codegen::StdError> + Send,
        > + Send
                          + 'static,
    >
{
}

impl<T> Service for T where
    T: tonic::client::GrpcService<
            tonic::body::Body,
            Error: Into<tonic::codegen::StdError>,
            ResponseBody: tonic::codegen::Body<
                Data = tonic::codegen::Bytes,
                Error: Into<tonic::codegen::StdError> + Send,
            > + Send
                              + 'static,
        >
{
}

/// `n` health checks (each printed with `print`); the name of the instance that answered
/// each.
async fn calls<T: Service>(
    client: &mut HealthClient<T>,
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
