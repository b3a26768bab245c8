"""A tampering Flower app for the tests."""
