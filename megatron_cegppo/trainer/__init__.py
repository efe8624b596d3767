"""The training loop and what runs it: process layout, stopping, failure reports."""
