//! Times as users write them (RFC 3339 text or Unix nanoseconds) turned
//! into the engine's timestamps: `i64` nanoseconds since 1970-01-01 UTC.
//!
//! `i64` nanoseconds span 1677-09-21 to 2262-04-11. A time outside that
//! span saturates to its nearest end rather than wrapping: a start after
//! 2262 finds nothing yet, an end after 2262 bounds nothing, a time before
//! 1677 is before every record. Years 0000 to 9999 parse (RFC 3339 has
//! four-digit years); anything else is refused with a message that names
//! the part that is wrong.

/// Parses RFC 3339 (`2026-11-24T10:00:00Z`, with optional fraction and
/// `±HH:MM` offset; a space for `T` and a missing offset, read as UTC, are
/// accepted) or a decimal integer of Unix nanoseconds (saturated to `i64`).
pub fn parse_time(text: &str) -> Result<i64, String> {
    let trimmed = text.trim();
    if let Some(nanoseconds) = parse_integer(trimmed) {
        return Ok(nanoseconds);
    }
    parse_rfc3339(trimmed).map_err(|reason| {
        format!(
            "time '{text}' is neither RFC 3339 (2026-11-24T10:00:00Z) nor Unix nanoseconds: {reason}"
        )
    })
}

/// A decimal integer, saturated to `i64`; `None` if it is not one.
fn parse_integer(text: &str) -> Option<i64> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    if digits.is_empty() || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    let saturated = if negative { i64::MIN } else { i64::MAX };
    Some(match digits.parse::<i128>() {
        Ok(value) => saturate(if negative { -value } else { value }),
        Err(_) => saturated,
    })
}

/// Clamps nanoseconds to what a timestamp can hold.
pub fn saturate(nanoseconds: i128) -> i64 {
    nanoseconds.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
}

const NANOSECONDS_PER_SECOND: i128 = 1_000_000_000;

/// Reads fixed-width decimal fields off the front of the text.
struct Cursor<'a> {
    rest: &'a [u8],
}

impl Cursor<'_> {
    fn number(&mut self, width: usize, what: &str) -> Result<i64, String> {
        let digits = self
            .rest
            .get(..width)
            .filter(|digits| digits.iter().all(u8::is_ascii_digit))
            .ok_or_else(|| format!("expected {width} digits of {what}"))?;
        self.rest = &self.rest[width..];
        Ok(digits
            .iter()
            .fold(0i64, |value, digit| value * 10 + i64::from(digit - b'0')))
    }

    fn expect(&mut self, allowed: &[u8], what: &str) -> Result<u8, String> {
        match self.rest.first() {
            Some(byte) if allowed.contains(byte) => {
                self.rest = &self.rest[1..];
                Ok(*byte)
            }
            _ => Err(format!("expected {what}")),
        }
    }
}

fn parse_rfc3339(text: &str) -> Result<i64, String> {
    let mut cursor = Cursor {
        rest: text.as_bytes(),
    };
    let year = cursor.number(4, "year")?;
    cursor.expect(b"-", "'-' after the year")?;
    let month = cursor.number(2, "month")?;
    cursor.expect(b"-", "'-' after the month")?;
    let day = cursor.number(2, "day")?;
    cursor.expect(b"Tt ", "'T' between date and time")?;
    let hour = cursor.number(2, "hour")?;
    cursor.expect(b":", "':' after the hour")?;
    let minute = cursor.number(2, "minute")?;
    cursor.expect(b":", "':' after the minute")?;
    let second = cursor.number(2, "second")?;
    if !(1..=12).contains(&month) {
        return Err(format!("month {month} is not 01 to 12"));
    }
    if day < 1 || day > days_in_month(year, month) {
        return Err(format!("day {day} is not in {year:04}-{month:02}"));
    }
    if hour > 23 || minute > 59 || second > 60 {
        return Err(format!(
            "{hour:02}:{minute:02}:{second:02} is not a time of day"
        ));
    }
    let mut fraction_ns = 0i128;
    if cursor.rest.first() == Some(&b'.') {
        cursor.rest = &cursor.rest[1..];
        let digits = cursor.rest.iter().take_while(|byte| byte.is_ascii_digit());
        let count = digits.clone().count();
        if count == 0 {
            return Err("expected digits after '.'".to_string());
        }
        // Digits past nanoseconds are dropped, not rounded.
        for (position, digit) in digits.enumerate().take(9) {
            fraction_ns += i128::from(digit - b'0') * 10i128.pow(8 - position as u32);
        }
        cursor.rest = &cursor.rest[count..];
    }
    let offset_seconds = match cursor.rest.first() {
        None => 0,
        Some(b'Z' | b'z') => {
            cursor.rest = &cursor.rest[1..];
            0
        }
        Some(b'+' | b'-') => {
            let sign = if cursor.expect(b"+-", "offset sign")? == b'-' {
                -1
            } else {
                1
            };
            let hours = cursor.number(2, "offset hours")?;
            cursor.expect(b":", "':' in the offset")?;
            let minutes = cursor.number(2, "offset minutes")?;
            if hours > 23 || minutes > 59 {
                return Err(format!("offset {hours:02}:{minutes:02} is out of range"));
            }
            sign * (hours * 3600 + minutes * 60)
        }
        Some(_) => return Err("expected 'Z' or an offset like +01:00".to_string()),
    };
    if !cursor.rest.is_empty() {
        return Err(format!(
            "unexpected '{}' at the end",
            String::from_utf8_lossy(cursor.rest)
        ));
    }
    let seconds = i128::from(days_from_civil(year, month, day)) * 86_400
        + i128::from(hour * 3600 + minute * 60 + second)
        - i128::from(offset_seconds);
    Ok(saturate(seconds * NANOSECONDS_PER_SECOND + fraction_ns))
}

fn is_leap_year(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap_year(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_from_march = (month + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// Civil date of a day count since 1970-01-01 (the inverse of
/// [`days_from_civil`], Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let shifted = days + 719_468;
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// A timestamp as RFC 3339 in UTC, the way Go writes a `time.Time` in
/// JSON (`RFC3339Nano`): the fraction without trailing zeros, none when
/// it is zero. JetStream clients parse times in this form.
pub fn format_rfc3339(nanoseconds: i64) -> String {
    let seconds = nanoseconds.div_euclid(1_000_000_000);
    let fraction = nanoseconds.rem_euclid(1_000_000_000);
    let (year, month, day) = civil_from_days(seconds.div_euclid(86_400));
    let second_of_day = seconds.rem_euclid(86_400);
    let mut text = format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        second_of_day / 3600,
        second_of_day % 3600 / 60,
        second_of_day % 60
    );
    if fraction > 0 {
        let digits = format!("{fraction:09}");
        text.push('.');
        text.push_str(digits.trim_end_matches('0'));
    }
    text.push('Z');
    text
}

/// Go's zero `time.Time` as JetStream writes it where there is no time
/// (the first and last message times of an empty stream).
pub const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatted_times_parse_back_and_match_go() {
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(
            format_rfc3339(1_795_514_400 * 1_000_000_000 + 500_000_000),
            "2026-11-24T10:00:00.5Z"
        );
        assert_eq!(
            format_rfc3339(951_782_400_123_456_789),
            "2000-02-29T00:00:00.123456789Z"
        );
        assert_eq!(format_rfc3339(-1), "1969-12-31T23:59:59.999999999Z");
        for nanoseconds in [
            i64::MIN,
            -2_208_988_800_000_000_001,
            -1,
            0,
            1,
            1_700_000_000_000_000_000,
            i64::MAX,
        ] {
            assert_eq!(
                parse_time(&format_rfc3339(nanoseconds)),
                Ok(nanoseconds),
                "{nanoseconds}"
            );
        }
    }

    #[test]
    fn rfc3339_in_range_matches_known_instants() {
        assert_eq!(parse_time("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(
            parse_time("2026-11-24T10:00:00Z"),
            Ok(1_795_514_400 * 1_000_000_000)
        );
        assert_eq!(
            parse_time("2026-11-24T11:00:00.5+01:00"),
            Ok(1_795_514_400 * 1_000_000_000 + 500_000_000)
        );
        assert_eq!(
            parse_time("2000-02-29 00:00:00.123456789123"),
            Ok(951_782_400_123_456_789)
        );
        assert_eq!(
            parse_time("1900-01-01T00:00:00Z"),
            Ok(-2_208_988_800 * 1_000_000_000)
        );
        assert_eq!(
            parse_time("1700000000000000000"),
            Ok(1_700_000_000_000_000_000)
        );
        assert_eq!(parse_time("-5"), Ok(-5));
    }

    #[test]
    fn times_outside_i64_nanoseconds_saturate() {
        assert_eq!(parse_time("2500-01-01T00:00:00Z"), Ok(i64::MAX));
        assert_eq!(parse_time("9999-12-31T23:59:59Z"), Ok(i64::MAX));
        assert_eq!(parse_time("0001-01-01T00:00:00Z"), Ok(i64::MIN));
        assert_eq!(parse_time("18446744073709551615"), Ok(i64::MAX));
        assert_eq!(parse_time("-99999999999999999999"), Ok(i64::MIN));
    }

    #[test]
    fn malformed_times_name_what_is_wrong() {
        for (text, reason) in [
            ("2026-13-01T00:00:00Z", "month 13"),
            ("2026-02-29T00:00:00Z", "day 29"),
            ("2026-01-01T24:00:00Z", "not a time of day"),
            ("2026-01-01", "'T' between date and time"),
            ("2026-01-01T00:00:00X", "'Z' or an offset"),
            ("2026-01-01T00:00:00Z junk", "unexpected"),
            ("yesterday", "digits of year"),
        ] {
            let error = parse_time(text).unwrap_err();
            assert!(error.contains(reason), "{text}: {error}");
            assert!(error.contains(text), "{text}: {error}");
        }
    }
}
