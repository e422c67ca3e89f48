//! The capabilities a provider may be granted, one module each: the grant, the client
//! that does the work, and the WIT import that checks the grant before anything is
//! done. Each import is a trait impl on [`ProviderState`], the data of one provider's
//! store: nothing a guest asks for is trusted.

pub(crate) mod dns;
pub(crate) mod http;
mod log;
pub(crate) mod tcp;

use crate::bindings::wasd::provider::types;
use crate::provider::ProviderState;

impl types::Host for ProviderState {}
