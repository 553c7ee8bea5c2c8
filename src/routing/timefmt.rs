//! strftime for header values (`%DOWNSTREAM_PEER_CERT_V_START(%b %e %Y)%`):
//! the conversions Envoy users write, over UTC.

use std::fmt::Write;

/// Envoy's default rendering of certificate validity bounds.
pub const DEFAULT_FORMAT: &str = "%Y-%m-%dT%H:%M:%S.000Z";

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const DAYS: [&str; 7] = [
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];

/// Now, for log lines: `2024-05-01T12:00:00Z`.
pub fn now_utc() -> String {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    format(seconds, "%Y-%m-%dT%H:%M:%SZ")
}

/// A time format this formatter cannot follow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimeFormatError {
    #[error("%{0} is not a supported time conversion")]
    Unsupported(char),
    #[error("a time format ends with a lone %")]
    LonePercent,
}

/// Conversions this formatter knows; anything else is a configuration error.
pub fn check(format: &str) -> Result<(), TimeFormatError> {
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c == '%' {
            match chars.next() {
                Some(
                    'Y' | 'y' | 'm' | 'd' | 'e' | 'H' | 'M' | 'S' | 'j' | 'b' | 'h' | 'B' | 'a'
                    | 'A' | 'Z' | 'z' | 's' | 'T' | 'F' | '%',
                ) => {}
                Some(other) => return Err(TimeFormatError::Unsupported(other)),
                None => return Err(TimeFormatError::LonePercent),
            }
        }
    }
    Ok(())
}

/// Formats seconds since the Unix epoch, UTC. `format` passed [`check`].
pub fn format(seconds: i64, format: &str) -> String {
    let days = seconds.div_euclid(86_400);
    let of_day = seconds.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (of_day / 3600, of_day % 3600 / 60, of_day % 60);
    let weekday = (days + 4).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let day_of_year = days - days_from_civil(year, 1, 1) + 1;
    let month_name = MONTHS[(month - 1) as usize];
    let mut out = String::with_capacity(format.len() + 16);
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        // Writing to a String cannot fail.
        let _ = match chars.next() {
            Some('Y') => write!(out, "{year}"),
            Some('y') => write!(out, "{:02}", year.rem_euclid(100)),
            Some('m') => write!(out, "{month:02}"),
            Some('d') => write!(out, "{day:02}"),
            Some('e') => write!(out, "{day:2}"),
            Some('H') => write!(out, "{hour:02}"),
            Some('M') => write!(out, "{minute:02}"),
            Some('S') => write!(out, "{second:02}"),
            Some('j') => write!(out, "{day_of_year:03}"),
            Some('b' | 'h') => write!(out, "{}", &month_name[..3]),
            Some('B') => write!(out, "{month_name}"),
            Some('a') => write!(out, "{}", &DAYS[weekday][..3]),
            Some('A') => write!(out, "{}", DAYS[weekday]),
            Some('Z') => write!(out, "UTC"),
            Some('z') => write!(out, "+0000"),
            Some('s') => write!(out, "{seconds}"),
            Some('T') => write!(out, "{hour:02}:{minute:02}:{second:02}"),
            Some('F') => write!(out, "{year}-{month:02}-{day:02}"),
            Some('%') => write!(out, "%"),
            Some(other) => write!(out, "%{other}"),
            None => write!(out, "%"),
        };
    }
    out
}

/// Howard Hinnant's `civil_from_days`: days since 1970-01-01 to a date.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2021-11-10T13:12:00Z, the client certificate's notBefore in Emissary's
    // KAT test of `%DOWNSTREAM_PEER_CERT_V_START%`.
    const KAT: i64 = 1_636_549_920;

    #[test]
    fn emissary_examples() {
        assert_eq!(format(KAT, DEFAULT_FORMAT), "2021-11-10T13:12:00.000Z");
        assert_eq!(
            format(KAT, "%b %e %H:%M:%S %Y %Z"),
            "Nov 10 13:12:00 2021 UTC"
        );
    }

    #[test]
    fn calendar_edges() {
        assert_eq!(format(0, "%F %T %a %j"), "1970-01-01 00:00:00 Thu 001");
        assert_eq!(format(951_782_400, "%F %A"), "2000-02-29 Tuesday");
        assert_eq!(format(-1, "%F %T"), "1969-12-31 23:59:59");
        assert_eq!(format(KAT, "%e|%d|%y|%B|%%"), "10|10|21|November|%");
    }

    #[test]
    fn unknown_conversions_are_refused() {
        assert!(check("%Y-%m").is_ok());
        assert!(check("%Q").is_err());
        assert!(check("100%").is_err());
    }
}
