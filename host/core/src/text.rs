//! Text that came from a provider, made safe to show: one sanitiser for error values,
//! panic messages and log lines, and one hex encoder.

/// Longest text kept from a provider: an error message, a log line.
pub const MAX_TEXT: usize = 4096;

/// `text` with control characters escaped (`\n`, `\u{1b}`, ...), so it cannot forge a
/// log line or drive a terminal, cut to `max` bytes on a character boundary (`…`
/// marks a cut).
pub fn sanitize(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max) + 3);
    for c in text.chars() {
        if c.is_control() {
            for e in c.escape_default() {
                out.push(e);
            }
        } else {
            out.push(c);
        }
        if out.len() > max {
            let mut cut = max;
            while !out.is_char_boundary(cut) {
                cut -= 1;
            }
            out.truncate(cut);
            out.push('…');
            return out;
        }
    }
    out
}

/// A short excerpt of a provider's string for an error message: sanitised, at most
/// 64 characters, with the full length when cut.
pub fn excerpt(text: &str) -> String {
    const SHOWN: usize = 64;
    let shown: String = text.chars().take(SHOWN).flat_map(char::escape_default).collect();
    if text.chars().nth(SHOWN).is_some() {
        format!("{shown}… ({} bytes)", text.len())
    } else {
        shown
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(sanitize("a\nb\x1b[2Jc", 100), "a\\nb\\u{1b}[2Jc");
        assert_eq!(sanitize("plain é", 100), "plain é");
    }

    #[test]
    fn text_is_capped_on_a_char_boundary() {
        let capped = sanitize(&"é".repeat(5000), MAX_TEXT);
        assert!(capped.len() <= MAX_TEXT + '…'.len_utf8());
        assert!(capped.ends_with('…'));
        assert_eq!(sanitize("short", MAX_TEXT), "short");
    }

    #[test]
    fn excerpts_are_short_and_escaped() {
        assert_eq!(excerpt("a\nb"), "a\\nb");
        let long = excerpt(&"x".repeat(100));
        assert!(long.ends_with("… (100 bytes)"), "{long}");
    }

    #[test]
    fn hex_is_lower_case() {
        assert_eq!(hex(&[0x00, 0xab, 0x7f]), "00ab7f");
    }
}
