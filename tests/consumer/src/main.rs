//! The README's "Embedding" snippet, run as a user's crate would run it: resolve
//! `https+http://catalog` from a `wasd.toml` and its `appsettings.json`, watch it, and
//! see a change arrive when the file is edited.

use std::time::Duration;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A folder of its own: wasd.toml with the configuration provider over
    // appsettings.json (relative paths are relative to the config file).
    let dir = std::env::temp_dir().join(format!("wasd-consumer-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let settings =
        |address: &str| format!(r#"{{"Services": {{"catalog": {{"https": ["https://{address}"]}}}}}}"#);
    std::fs::write(dir.join("appsettings.json"), settings("10.0.0.1:443"))?;
    std::fs::write(
        dir.join("wasd.toml"),
        "[[provider]]\nbuiltin = \"config\"\ngrants = { files = [\"appsettings.json\"] }\n",
    )?;
    std::env::set_current_dir(&dir)?;

    // --- the README snippet ---
    let resolver = wasd::Resolver::builder().config_file("wasd.toml").build().await?;
    let endpoints = resolver.resolve("https+http://catalog").await?;
    let mut watch = resolver.watch("https+http://catalog").await?;
    // --- end of the snippet (its loop follows, bounded) ---

    println!("resolved: {endpoints}");
    assert_eq!(endpoints.to_string(), "https://10.0.0.1:443 (from config)");
    std::fs::write(dir.join("appsettings.json"), settings("10.0.0.2:443"))?;
    let changed = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(set) = watch.changed().await {
            if set.iter().any(|e| e.host() == "10.0.0.2") {
                return Some(set);
            }
        }
        None
    })
    .await?
    .ok_or("the watch ended before the change arrived")?;
    println!("changed: {changed}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
