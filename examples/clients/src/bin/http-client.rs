//! An HTTP client that calls `https+http://catalog/items` by name: three axum instances
//! of `catalog`, found in an appsettings.json (or registered in etcd with `--etcd URL`),
//! requests balanced over them, then one instance taken out of discovery.
//!
//! ```sh
//! cargo run -p wasd-examples --bin http-client -- --strategy p2c
//! ```

use clap::Parser;
use wasd_examples::{Discovery, crypto_provider, http_instance, tally};

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    discovery: Discovery,
    /// How each request's instance is picked.
    #[arg(long, value_enum, default_value = "round-robin")]
    strategy: Strategy,
    /// Instances to start.
    #[arg(long, default_value_t = 3)]
    instances: usize,
    /// Requests before and after an instance leaves.
    #[arg(long, default_value_t = 6)]
    requests: usize,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Strategy {
    RoundRobin,
    Random,
    P2c,
    PickFirst,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    crypto_provider();
    let mut urls = Vec::new();
    for i in 1..=args.instances {
        urls.push(format!("http://{}", http_instance(format!("catalog-{i}")).await?));
    }
    let mut discovered = args.discovery.start("catalog", "http", &urls).await?;

    let strategy = match args.strategy {
        Strategy::RoundRobin => wasd::Strategy::RoundRobin,
        Strategy::Random => wasd::Strategy::Random,
        Strategy::P2c => wasd::Strategy::PowerOfTwoChoices,
        Strategy::PickFirst => wasd::Strategy::PickFirst,
    };
    // `discovered.resolver.http_client()` is the same with round-robin.
    let client = wasd::http::Discovery::builder(&discovered.resolver)
        .strategy(strategy)
        .build()
        .client()?;

    let answers = requests(&client, args.requests).await?;
    println!("answered: {}", tally(&answers));

    let leaving = urls.last().expect("at least one instance");
    discovered.remove(leaving, "https+http://catalog").await?;
    println!("removed {leaving} from discovery");
    let answers = requests(&client, args.requests).await?;
    println!("answered: {}", tally(&answers));

    discovered.stop().await
}

/// `n` requests; the name of the instance that answered each.
async fn requests(client: &wasd::http::ClientWithMiddleware, n: usize) -> anyhow::Result<Vec<String>> {
    let mut answered = Vec::new();
    for _ in 0..n {
        let response = client
            .get("https+http://catalog/items")
            .send()
            .await?
            .error_for_status()?;
        let url = response.url().clone();
        let body = response.text().await?;
        println!("GET https+http://catalog/items -> {url}: {body}");
        answered.push(body.split(' ').next().unwrap_or_default().to_owned());
    }
    Ok(answered)
}
