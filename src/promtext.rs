//! Reading Prometheus text exposition (what every weft proxy serves on
//! `/metrics`): `weft local status` and the operator's rollout scraper.

use std::collections::BTreeMap;

/// One line of Prometheus text: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses Prometheus/OpenMetrics text, skipping comments and lines it
/// cannot read (a scrape is a picture, not a contract).
pub fn parse_metrics(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let (name, rest) = match line.find(['{', ' ']) {
        Some(i) => line.split_at(i),
        None => return None,
    };
    let mut labels = BTreeMap::new();
    let rest = if let Some(mut body) = rest.strip_prefix('{') {
        loop {
            body = body.trim_start_matches([',', ' ']);
            if let Some(after) = body.strip_prefix('}') {
                break after;
            }
            let (key, after) = body.split_once("=\"")?;
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                let (i, c) = chars.next()?;
                match c {
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    '"' => break i,
                    c => value.push(c),
                }
            };
            labels.insert(key.trim().to_owned(), value);
            body = &after[end + 1..];
        }
    } else {
        rest
    };
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labels_with_escapes_and_skips_comments() {
        let text = "# HELP x\n# TYPE x counter\nweft_proxy_requests_total{direction=\"outbound\",src=\"a\\\"b\",dst=\"c\"} 12\nup 1\nbad{x=\"1\" \n";
        let s = parse_metrics(text);
        assert_eq!(s.len(), 2, "{s:?}");
        assert_eq!(s[0].labels["src"], "a\"b");
        assert_eq!(s[0].value, 12.0);
        assert_eq!(s[1].name, "up");
    }
}
