//! Gateway API durations (GEP-2257), used by HTTPRoute timeouts and retries and by nodemesh's
//! own duration annotations: one to four components, each one to five digits and a unit (`h`,
//! `m`, `s`, `ms`), added up as Go's `time.ParseDuration` would (`10s`, `500ms`, `1h2m3s`,
//! `1m90s`). No fractions, signs, spaces or smaller units.

/// Returns `text` in milliseconds, or why it is not a Gateway API duration.
pub fn parse_millis(text: &str) -> Result<u64, String> {
    let invalid = || format!("{text:?} is not a duration (like \"10s\", \"500ms\" or \"1h30m\")");
    let mut rest = text.as_bytes();
    let (mut total, mut components) = (0u64, 0);
    while !rest.is_empty() {
        components += 1;
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        if digits == 0 || digits > 5 || components > 4 {
            return Err(invalid());
        }
        let value: u64 = text[text.len() - rest.len()..][..digits].parse().map_err(|_| invalid())?;
        rest = &rest[digits..];
        let (unit_ms, unit_len) = match rest {
            [b'm', b's', ..] => (1, 2),
            [b'h', ..] => (3_600_000, 1),
            [b'm', ..] => (60_000, 1),
            [b's', ..] => (1_000, 1),
            _ => return Err(invalid()),
        };
        rest = &rest[unit_len..];
        // At most 4 × 99,999 h: far from overflowing.
        total += value * unit_ms;
    }
    if components == 0 {
        return Err(invalid());
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::parse_millis;

    #[test]
    fn gep_2257_durations_parse_to_milliseconds() {
        let cases = [
            ("0s", 0),
            ("10s", 10_000),
            ("500ms", 500),
            ("1m", 60_000),
            ("1h", 3_600_000),
            ("1h2m3s", 3_723_000),
            ("1h30m30s500ms", 5_430_500),
            ("01h", 3_600_000),
            ("00060m", 3_600_000),
            ("1m90s", 150_000),
            ("99999h", 99_999 * 3_600_000),
        ];
        for (text, millis) in cases {
            assert_eq!(parse_millis(text), Ok(millis), "{text}");
        }
    }

    #[test]
    fn anything_else_is_refused_with_the_value() {
        for text in
            ["", "10", "s", "1.5s", "-1s", "1d", "10 s", "1us", "100000s", "1h1m1s1ms1h", "1S", "ms", "1sm"]
        {
            let err = parse_millis(text).expect_err(text);
            assert!(err.contains(&format!("{text:?}")) && err.contains("is not a duration"), "{err}");
        }
    }
}
