//! Reading a daemon's Prometheus endpoint, as a scraper would.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// The text a `/metrics` endpoint at `address` serves (headers included).
pub fn scrape(address: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(address)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: ballast\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok(text)
}

/// The sum of every sample of `metric` (all label sets) in `text`.
pub fn sum(text: &str, metric: &str) -> f64 {
    text.lines()
        .filter(|line| line.strip_prefix(metric).is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' ')))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    #[test]
    fn sums_every_label_set_of_one_metric_only() {
        let text = "# HELP a_total x\na_total{r=\"x\"} 2\na_total{r=\"y\"} 3.5\na_total_more 7\nb 1\n";
        assert_eq!(super::sum(text, "a_total"), 5.5);
        assert_eq!(super::sum(text, "b"), 1.0);
        assert_eq!(super::sum(text, "c"), 0.0);
    }
}
