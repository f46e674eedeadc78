//! Times as people type them and as the tools print them.
//!
//! Input: `today`, `yesterday` and dates are market days; `now`; naive
//! timestamps (`2026-11-26 09:15`, `2026-11-26T09:15:03.5`) are market time
//! (Asia/Ho_Chi_Minh, UTC+7); RFC 3339 timestamps are taken as they are.
//! They are converted here, so the service only ever sees its own two forms.
//!
//! Output: RFC 3339 with exactly six fractional digits in the chosen zone,
//! so sorting the text sorts by time.

use chrono::{DateTime, Days, NaiveDate, NaiveDateTime, SecondsFormat, TimeZone, Utc};

use tickvault::history::request::market_offset;

/// The zone timestamps are printed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Tz {
    /// Asia/Ho_Chi_Minh (UTC+7), e.g. 2026-11-26T09:15:03.123000+07:00.
    Market,
    /// UTC, e.g. 2026-11-26T02:15:03.123000Z.
    Utc,
}

impl Tz {
    /// `ts` with microsecond precision, always the same width.
    pub fn format(self, ts: DateTime<Utc>) -> String {
        match self {
            Tz::Market => ts
                .with_timezone(&market_offset())
                .to_rfc3339_opts(SecondsFormat::Micros, false),
            Tz::Utc => ts.to_rfc3339_opts(SecondsFormat::Micros, true),
        }
    }

    /// An RFC 3339 text re-written in this zone; other text as it is.
    pub fn reformat(self, text: &str) -> Option<String> {
        DateTime::parse_from_rfc3339(text)
            .ok()
            .map(|ts| self.format(ts.with_timezone(&Utc)))
    }

    /// Characters of [`Tz::format`]'s output.
    pub fn width(self) -> usize {
        match self {
            Tz::Market => "2026-11-26T09:15:03.123456+07:00".len(),
            Tz::Utc => "2026-11-26T02:15:03.123456Z".len(),
        }
    }
}

/// A time argument: the instants it covers and the text to send the
/// history service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimeArg {
    /// The first instant.
    pub start: DateTime<Utc>,
    /// The instant after it: the next market midnight for a day, else `start`.
    pub end: DateTime<Utc>,
    /// A date (`YYYY-MM-DD`) for a day, RFC 3339 otherwise.
    pub wire: String,
}

const NAIVE_FORMATS: [&str; 4] = [
    "%Y-%m-%dT%H:%M:%S%.f",
    "%Y-%m-%d %H:%M:%S%.f",
    "%Y-%m-%dT%H:%M",
    "%Y-%m-%d %H:%M",
];

impl TimeArg {
    /// Parses `text` as of `now`.
    pub fn parse(text: &str, now: DateTime<Utc>) -> Result<TimeArg, String> {
        let text = text.trim();
        let today = now.with_timezone(&market_offset()).date_naive();
        let day = match text.to_ascii_lowercase().as_str() {
            "now" => return Ok(Self::instant(now)),
            "today" => Some(today),
            "yesterday" => today.checked_sub_days(Days::new(1)),
            _ => NaiveDate::parse_from_str(text, "%Y-%m-%d").ok(),
        };
        if let Some(day) = day {
            let start = market_midnight(day);
            let end = day.checked_add_days(Days::new(1)).and_then(market_midnight);
            if let (Some(start), Some(end)) = (start, end) {
                return Ok(TimeArg {
                    start,
                    end,
                    wire: day.format("%Y-%m-%d").to_string(),
                });
            }
        }
        if let Ok(ts) = DateTime::parse_from_rfc3339(text) {
            let mut arg = Self::instant(ts.with_timezone(&Utc));
            arg.wire = text.to_string();
            return Ok(arg);
        }
        NAIVE_FORMATS
            .iter()
            .find_map(|format| NaiveDateTime::parse_from_str(text, format).ok())
            .and_then(|naive| market_offset().from_local_datetime(&naive).single())
            .map(|ts| Self::instant(ts.with_timezone(&Utc)))
            .ok_or_else(|| {
                format!(
                    "{text:?} is not a time: use today, yesterday, now, a market day YYYY-MM-DD, \
                     market time YYYY-MM-DD HH:MM[:SS] or an RFC 3339 timestamp"
                )
            })
    }

    fn instant(ts: DateTime<Utc>) -> TimeArg {
        TimeArg {
            start: ts,
            end: ts,
            wire: Tz::Market.format(ts),
        }
    }
}

fn market_midnight(day: NaiveDate) -> Option<DateTime<Utc>> {
    market_offset()
        .from_local_datetime(&day.and_hms_opt(0, 0, 0)?)
        .single()
        .map(|ts| ts.with_timezone(&Utc))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn days_are_market_days() {
        // 18:30 UTC on the 25th is already the 26th in Ho Chi Minh City.
        let now = utc("2026-11-25T18:30:00Z");
        let today = TimeArg::parse("Today", now).unwrap();
        assert_eq!(today.wire, "2026-11-26");
        assert_eq!(today.start, utc("2026-11-25T17:00:00Z"));
        assert_eq!(today.end, utc("2026-11-26T17:00:00Z"));
        assert_eq!(TimeArg::parse("yesterday", now).unwrap().wire, "2026-11-25");
        let date = TimeArg::parse(" 2026-11-20 ", now).unwrap();
        assert_eq!(date.start, utc("2026-11-19T17:00:00Z"));
        assert_eq!(TimeArg::parse("now", now).unwrap().start, now);
    }

    #[test]
    fn naive_times_are_market_time_and_offsets_are_kept() {
        let now = Utc::now();
        for text in [
            "2026-11-26 09:15",
            "2026-11-26T09:15",
            "2026-11-26 09:15:00",
            "2026-11-26T09:15:00.000",
        ] {
            let arg = TimeArg::parse(text, now).unwrap();
            assert_eq!(arg.start, utc("2026-11-26T02:15:00Z"), "{text}");
            assert_eq!(arg.end, arg.start);
            assert_eq!(arg.wire, "2026-11-26T09:15:00.000000+07:00");
        }
        let given = TimeArg::parse("2026-11-26T02:15:00Z", now).unwrap();
        assert_eq!(given.wire, "2026-11-26T02:15:00Z");
        assert_eq!(given.start, utc("2026-11-26T02:15:00Z"));
        for bad in ["soon", "2026-13-01", "26/11/2026", "2026-11-26 25:00", ""] {
            let message = TimeArg::parse(bad, now).unwrap_err();
            assert!(message.contains("market day"), "{bad}: {message}");
        }
    }

    #[test]
    fn printed_times_have_a_fixed_width_and_sort_as_text() {
        let times = [
            utc("2026-11-26T02:15:03Z"),
            utc("2026-11-26T02:15:03.000001Z"),
            utc("2026-11-26T02:15:03.5Z"),
            utc("2026-11-26T17:00:00Z"),
        ];
        for tz in [Tz::Market, Tz::Utc] {
            let texts: Vec<String> = times.iter().map(|t| tz.format(*t)).collect();
            assert!(texts.iter().all(|t| t.len() == tz.width()), "{texts:?}");
            let mut sorted = texts.clone();
            sorted.sort();
            assert_eq!(sorted, texts);
        }
        assert_eq!(
            Tz::Market.format(times[0]),
            "2026-11-26T09:15:03.000000+07:00"
        );
        assert_eq!(Tz::Utc.format(times[2]), "2026-11-26T02:15:03.500000Z");
        assert_eq!(
            Tz::Market.reformat("2026-11-26T17:00:00Z").as_deref(),
            Some("2026-11-27T00:00:00.000000+07:00")
        );
        assert_eq!(Tz::Utc.reformat("FPT"), None);
    }
}
