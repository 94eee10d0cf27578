//! Durations as Istio objects spell them: Go's `time.ParseDuration` syntax (`0.5s`, `100ms`,
//! `1m30s`, `1h`), which is also what protobuf's JSON `Duration` (`"1.5s"`) is a subset of.
use std::time::Duration;

/// Parses `text`; the error says what is wrong with it.
pub fn parse(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = s;
    let mut total = 0f64;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("{text:?}: a number without a unit (s, ms, m, h ...)"))?;
        let (number, tail) = rest.split_at(number_len);
        let value: f64 = number
            .parse()
            .map_err(|_| format!("{text:?}: {number:?} is not a number"))?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_len);
        let seconds = match unit {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(format!("{text:?}: unknown unit {unit:?}")),
        };
        total += value * seconds;
        rest = next;
    }
    if !total.is_finite() || total > 10.0 * 365.0 * 86_400.0 {
        return Err(format!("{text:?}: out of range"));
    }
    Ok(Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_and_protobuf_spellings() {
        let ms = Duration::from_millis;
        assert_eq!(parse("0.5s"), Ok(ms(500)));
        assert_eq!(parse("100ms"), Ok(ms(100)));
        assert_eq!(parse("1m30s"), Ok(ms(90_000)));
        assert_eq!(parse("2h"), Ok(ms(7_200_000)));
        assert_eq!(parse("0"), Ok(Duration::ZERO));
        assert_eq!(parse("1.5s"), Ok(ms(1500)));
        for bad in ["", "5", "s", "1x", "-1s", "1..2s", "99999999999h"] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
