//! Settings values as every registry provider reads them, with one-line errors naming
//! the setting.

use std::time::Duration;

use wasd_sdk::Error;

/// `"500ms"`, `"2s"`, `"1m"`.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let digits = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(digits);
    let n: u64 = number.parse().ok()?;
    match unit.trim() {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => Some(Duration::from_secs(n * 60)),
        _ => None,
    }
}

/// `"16MiB"`, `"512KiB"` or a number of bytes.
pub fn parse_size(text: &str) -> Option<usize> {
    let text = text.trim();
    let digits = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let n: usize = number.parse().ok()?;
    let scale = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(scale).filter(|n| *n > 0)
}

/// A user and password from `settings.{user_key}` with `password` or `password-env`
/// (the name of a granted environment variable): both or neither.
pub fn credentials(
    user: Option<String>,
    password: Option<String>,
    password_env: Option<String>,
    user_key: &str,
) -> Result<Option<(String, String)>, Error> {
    let password = match (password, password_env) {
        (Some(_), Some(_)) => {
            return Err(Error::InvalidSettings(
                "settings: give `password` or `password-env`, not both".into(),
            ));
        }
        (Some(p), None) => Some(p),
        (None, Some(var)) => Some(std::env::var(&var).map_err(|_| {
            Error::InvalidSettings(format!(
                "settings.password-env: the variable '{var}' is not set or not granted (grants.env)"
            ))
        })?),
        (None, None) => None,
    };
    match (user, password) {
        (Some(user), Some(password)) => Ok(Some((user, password))),
        (None, None) => Ok(None),
        _ => Err(Error::InvalidSettings(format!(
            "settings: `{user_key}` and a password go together"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("2"), None);
        assert_eq!(parse_duration("fast"), None);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("16MiB"), Some(16 << 20));
        assert_eq!(parse_size("512KiB"), Some(512 << 10));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("0"), None);
        assert_eq!(parse_size("16MB"), None);
    }

    #[test]
    fn credentials_go_together() {
        let c = |u: Option<&str>, p: Option<&str>| {
            credentials(u.map(Into::into), p.map(Into::into), None, "user")
        };
        assert_eq!(c(Some("u"), Some("p")).unwrap(), Some(("u".into(), "p".into())));
        assert_eq!(c(None, None).unwrap(), None);
        assert!(matches!(c(Some("u"), None), Err(Error::InvalidSettings(m)) if m.contains("`user`")));
        assert!(credentials(None, Some("p".into()), Some("V".into()), "user").is_err());
        let missing = credentials(
            Some("u".into()),
            None,
            Some("WASD_SURELY_UNSET_42".into()),
            "user",
        );
        assert!(matches!(missing, Err(Error::InvalidSettings(m)) if m.contains("WASD_SURELY_UNSET_42")));
    }
}
