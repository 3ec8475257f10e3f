//! `counted_enum!`: an enum whose variants index counter arrays, exhaustive by construction.
//!
//! The macro writes the enum, its `ALL` list (every variant, in declaration order), `COUNT`,
//! and `index()`. A counter array is `[u64; E::COUNT]` indexed by `e.index()`: because the
//! list is generated from the declaration, a new variant is counted without anyone updating
//! a list by hand, and no index can fall outside the array.

/// Declares a fieldless enum with `ALL`, `COUNT` and `index()` (see the module docs).
macro_rules! counted_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident, )+
        }
    ) => {
        $(#[$meta])*
        $vis enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// The number of variants (the length of a counter array indexed by them).
            $vis const COUNT: usize = [$(stringify!($variant)),+].len();

            /// Every variant, in declaration order: the order of counter arrays.
            $vis const ALL: [Self; Self::COUNT] = [$(Self::$variant),+];

            /// This variant's position in [`Self::ALL`] and in counter arrays; always below
            /// [`Self::COUNT`].
            #[must_use]
            $vis const fn index(self) -> usize {
                self as usize
            }
        }
    };
}

pub(crate) use counted_enum;

#[cfg(test)]
mod tests {
    counted_enum! {
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        enum Example {
            First,
            Second,
            Third,
        }
    }

    #[test]
    fn every_variant_is_listed_once_at_its_index() {
        assert_eq!(Example::COUNT, 3);
        for (i, v) in Example::ALL.iter().enumerate() {
            assert_eq!(v.index(), i);
        }
        assert_eq!(
            Example::ALL,
            [Example::First, Example::Second, Example::Third]
        );
    }
}
