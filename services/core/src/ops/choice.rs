//! An enum value as a caller sent it: not set, one of the values, or a number the API does not
//! know. Resources read it when they validate the fields an operation uses, so an unknown or
//! missing value is refused naming the field — and only when the field matters (an update
//! ignores what its mask does not name).

use tokenfleet_domain::{Valid, ValidationError};

/// An enum value as sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Choice<T> {
    /// Not set (the wire's UNSPECIFIED).
    #[default]
    Unset,
    /// One of the values.
    Is(T),
    /// A number no value has.
    Unknown(i32),
}

impl<T: Copy> Choice<T> {
    /// The value, `None` when unset; an unknown number is an error naming `field`.
    pub fn optional(self, field: &str) -> Valid<Option<T>> {
        match self {
            Self::Unset => Ok(None),
            Self::Is(value) => Ok(Some(value)),
            Self::Unknown(n) => Err(ValidationError::new(field, format!("unknown value {n}"))),
        }
    }

    /// The value; unset or unknown is an error naming `field`.
    pub fn required(self, field: &str) -> Valid<T> {
        self.optional(field)?
            .ok_or_else(|| ValidationError::new(field, "must be set (UNSPECIFIED is not a value)"))
    }
}

impl<T> From<T> for Choice<T> {
    fn from(value: T) -> Self {
        Self::Is(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_and_unknown_values_name_the_field() {
        assert_eq!(Choice::Is(3).required("f").unwrap(), 3);
        assert_eq!(Choice::<u8>::Unset.optional("f").unwrap(), None);
        let err = Choice::<u8>::Unset.required("mailbox.kind").unwrap_err();
        assert_eq!(
            err.to_string(),
            "mailbox.kind: must be set (UNSPECIFIED is not a value)"
        );
        let err = Choice::<u8>::Unknown(42)
            .optional("mailbox.grant_type")
            .unwrap_err();
        assert_eq!(err.to_string(), "mailbox.grant_type: unknown value 42");
    }
}
