//! The query parser: any string is a query or a clear error; a query's parts obey the
//! parser's own rules, and re-parsing what it accepted gives the same query.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &str| {
    match wasd::Query::parse(input) {
        Ok(query) => {
            assert!(!query.service().is_empty());
            assert_eq!(query.service(), query.service().to_ascii_lowercase());
            assert!(query.schemes().iter().all(|s| !s.is_empty()));
            let again = wasd::Query::parse(query.as_str()).expect("an accepted query parses again");
            assert_eq!(again, query);
        }
        Err(e) => {
            let message = e.to_string();
            assert!(message.starts_with("invalid query"), "{message}");
            assert!(!message.contains('\n'), "one line: {message}");
        }
    }
});
