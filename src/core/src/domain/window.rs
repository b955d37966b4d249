//! Call windows: "only call between 09:00 and 18:00 Monday to Friday in the callee's time
//! zone". Pure: the current instant is a parameter, so tests control the clock.

use chrono::{DateTime, Datelike, Duration, NaiveTime, TimeZone, Utc, Weekday};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallWindow {
    /// IANA time zone of the callee, e.g. `America/New_York`.
    pub timezone: String,
    /// Local start time, `HH:MM`.
    pub start: String,
    /// Local end time, `HH:MM` (exclusive); earlier than `start` means the window crosses
    /// midnight.
    pub end: String,
    /// Allowed local days (`mon`..`sun`); empty or absent means every day.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub days: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    // The messages name what is expected and never echo the input back (it could hold
    // anything, and Rust's debug quoting of it means nothing to a client).
    #[error("is not an IANA time zone such as America/New_York")]
    Timezone(String),
    #[error("is not a local time written HH:MM, such as 09:00")]
    Time { field: &'static str, value: String },
    #[error("may hold only mon, tue, wed, thu, fri, sat and sun")]
    Day(String),
    #[error("start and end are equal")]
    Empty,
}

/// A validated window.
#[derive(Debug, Clone)]
pub struct ParsedWindow {
    tz: Tz,
    start: NaiveTime,
    end: NaiveTime,
    days: Vec<Weekday>,
}

fn parse_time(field: &'static str, value: &str) -> Result<NaiveTime, WindowError> {
    NaiveTime::parse_from_str(value, "%H:%M").map_err(|_| WindowError::Time {
        field,
        value: value.to_owned(),
    })
}

fn parse_day(value: &str) -> Result<Weekday, WindowError> {
    match value.to_ascii_lowercase().get(..3) {
        Some("mon") => Ok(Weekday::Mon),
        Some("tue") => Ok(Weekday::Tue),
        Some("wed") => Ok(Weekday::Wed),
        Some("thu") => Ok(Weekday::Thu),
        Some("fri") => Ok(Weekday::Fri),
        Some("sat") => Ok(Weekday::Sat),
        Some("sun") => Ok(Weekday::Sun),
        _ => Err(WindowError::Day(value.to_owned())),
    }
}

impl CallWindow {
    pub fn parse(&self) -> Result<ParsedWindow, WindowError> {
        let tz: Tz = self
            .timezone
            .parse()
            .map_err(|_| WindowError::Timezone(self.timezone.clone()))?;
        let start = parse_time("start", &self.start)?;
        let end = parse_time("end", &self.end)?;
        if start == end {
            return Err(WindowError::Empty);
        }
        let days = self
            .days
            .iter()
            .flatten()
            .map(|d| parse_day(d))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ParsedWindow {
            tz,
            start,
            end,
            days,
        })
    }
}

impl ParsedWindow {
    fn day_allowed(&self, day: Weekday) -> bool {
        self.days.is_empty() || self.days.contains(&day)
    }

    /// Whether `at` falls inside the window.
    pub fn contains(&self, at: DateTime<Utc>) -> bool {
        let local = at.with_timezone(&self.tz);
        let t = local.time();
        if self.start < self.end {
            self.day_allowed(local.weekday()) && t >= self.start && t < self.end
        } else if t >= self.start {
            // Overnight window: the part after start belongs to today's window.
            self.day_allowed(local.weekday())
        } else {
            t < self.end && self.day_allowed(local.weekday().pred())
        }
    }

    /// The earliest instant at or after `now` inside the window (`now` itself when open).
    pub fn next_open(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        if self.contains(now) {
            return now;
        }
        let local_date = now.with_timezone(&self.tz).date_naive();
        // Eight days cover every weekly pattern; DST gaps are skipped via `earliest`.
        for offset in 0..9 {
            let date = local_date + Duration::days(offset);
            if !self.day_allowed(date.weekday()) {
                continue;
            }
            if let Some(candidate) = self
                .tz
                .from_local_datetime(&date.and_time(self.start))
                .earliest()
            {
                let candidate = candidate.with_timezone(&Utc);
                if candidate >= now {
                    return candidate;
                }
            }
        }
        now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(days: Option<Vec<&str>>) -> ParsedWindow {
        CallWindow {
            timezone: "America/New_York".into(),
            start: "09:00".into(),
            end: "18:00".into(),
            days: days.map(|d| d.into_iter().map(String::from).collect()),
        }
        .parse()
        .expect("valid window")
    }

    fn utc(s: &str) -> DateTime<Utc> {
        s.parse().expect("rfc3339")
    }

    #[test]
    fn open_inside_and_deferred_outside() {
        let w = window(None);
        // 2026-11-20 is a Friday; 14:00 UTC = 09:00 EST.
        assert!(w.contains(utc("2026-11-20T14:00:00Z")));
        assert_eq!(
            w.next_open(utc("2026-11-20T15:00:00Z")),
            utc("2026-11-20T15:00:00Z")
        );
        assert_eq!(
            w.next_open(utc("2026-11-20T23:30:00Z")),
            utc("2026-11-21T14:00:00Z")
        );
        assert_eq!(
            w.next_open(utc("2026-11-20T03:00:00Z")),
            utc("2026-11-20T14:00:00Z")
        );
    }

    #[test]
    fn weekdays_skip_the_weekend() {
        let w = window(Some(vec!["mon", "tue", "wed", "thu", "fri"]));
        assert_eq!(
            w.next_open(utc("2026-11-20T23:30:00Z")),
            utc("2026-11-23T14:00:00Z")
        );
    }

    #[test]
    fn rejects_bad_fields() {
        let mut cw = CallWindow {
            timezone: "Mars/Base".into(),
            start: "09:00".into(),
            end: "18:00".into(),
            days: None,
        };
        assert!(matches!(cw.parse(), Err(WindowError::Timezone(_))));
        cw.timezone = "UTC".into();
        cw.start = "9am".into();
        assert!(matches!(
            cw.parse(),
            Err(WindowError::Time { field: "start", .. })
        ));
        cw.start = "22:00".into();
        cw.end = "06:00".into();
        let overnight = cw.parse().expect("overnight window");
        assert!(overnight.contains(utc("2026-11-20T23:00:00Z")));
        assert!(overnight.contains(utc("2026-11-21T05:00:00Z")));
        assert!(!overnight.contains(utc("2026-11-21T12:00:00Z")));
    }
}
