//! sakuga composition root
