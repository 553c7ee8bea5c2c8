//! Route matching: predicates, path normalisation, header edits and the
//! ordered route table. Pure code with no I/O, tested on its own.

pub mod headers;
pub mod matchers;
pub mod path;
pub mod redirect;
pub mod table;
pub mod timefmt;
pub mod xfcc;
