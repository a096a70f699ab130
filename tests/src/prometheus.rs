//! Reading Prometheus text exposition (mesh-node's `:15020/metrics`) in tests: samples of a
//! metric with their labels, and sums over those that match some labels.

use std::collections::BTreeMap;

/// One sample: its labels and value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    /// Returns whether every `(name, value)` of `wanted` is one of its labels.
    pub fn matches(&self, wanted: &[(&str, &str)]) -> bool {
        wanted.iter().all(|(name, value)| self.labels.get(*name).is_some_and(|v| v == value))
    }
}

/// Returns the samples of the metric `name` (exactly that name, e.g. `istio_requests_total`).
pub fn samples(text: &str, name: &str) -> Vec<Sample> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let (labels, value) = if let Some(inner) = rest.strip_prefix('{') {
                let end = label_block_end(inner)?;
                (parse_labels(&inner[..end]), &inner[end + 1..])
            } else if rest.starts_with(' ') {
                (BTreeMap::new(), rest)
            } else {
                return None; // another metric with this prefix
            };
            let value = value.split_whitespace().next()?.parse().ok()?;
            Some(Sample { labels, value })
        })
        .collect()
}

/// Returns the sum of the samples of `name` whose labels include all of `wanted`.
pub fn sum(text: &str, name: &str, wanted: &[(&str, &str)]) -> f64 {
    samples(text, name).iter().filter(|s| s.matches(wanted)).map(|s| s.value).sum()
}

/// Returns the index of the `}` closing a label block (quotes and escapes respected).
fn label_block_end(inner: &str) -> Option<usize> {
    let (mut quoted, mut escaped) = (false, false);
    for (at, c) in inner.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '}' if !quoted => return Some(at),
            _ => {}
        }
    }
    None
}

fn parse_labels(block: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut rest = block;
    while let Some((name, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((at, c)) = chars.next() {
            match c {
                '\\' => match chars.next().map(|(_, e)| e) {
                    Some('n') => value.push('\n'),
                    Some(other) => value.push(other),
                    None => {}
                },
                '"' => {
                    end = at + 1;
                    break;
                }
                _ => value.push(c),
            }
        }
        labels.insert(name.trim().trim_start_matches(',').trim().to_owned(), value);
        rest = &after[end..];
    }
    labels
}

#[cfg(test)]
mod tests {
    use super::{samples, sum};

    const TEXT: &str = r#"# HELP istio_requests Requests.
# TYPE istio_requests counter
istio_requests_total{reporter="destination",source_workload="a1",destination_workload="b1",response_code="200"} 7
istio_requests_total{reporter="destination",source_workload="a2",destination_workload="b1",response_code="200"} 2
istio_requests_total{reporter="destination",source_workload="a1",destination_workload="b1",response_code="403"} 3
istio_requests_total{reporter="source",source_workload="a1",destination_workload="b1",response_code="200"} 1
istio_requests_total_created{reporter="source"} 1700000000.5
istio_request_duration_milliseconds_bucket{le="1",odd="a \"quoted\", }value"} 4
nodemesh_pods_enrolled 2
"#;

    #[test]
    fn sums_count_only_the_matching_samples() {
        assert_eq!(
            sum(TEXT, "istio_requests_total", &[("reporter", "destination"), ("response_code", "200")]),
            9.0
        );
        assert_eq!(
            sum(
                TEXT,
                "istio_requests_total",
                &[("reporter", "destination"), ("source_workload", "a1"), ("response_code", "403")]
            ),
            3.0
        );
        assert_eq!(sum(TEXT, "istio_requests_total", &[("response_code", "500")]), 0.0);
        assert_eq!(samples(TEXT, "istio_requests_total").len(), 4, "_created is another metric");
        assert_eq!(samples(TEXT, "nodemesh_pods_enrolled")[0].value, 2.0);
    }

    #[test]
    fn quoted_label_values_may_hold_commas_braces_and_quotes() {
        let bucket = &samples(TEXT, "istio_request_duration_milliseconds_bucket")[0];
        assert_eq!(bucket.labels["odd"], "a \"quoted\", }value");
        assert_eq!(bucket.labels["le"], "1");
        assert_eq!(bucket.value, 4.0);
    }
}
