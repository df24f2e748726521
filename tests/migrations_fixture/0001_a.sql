-- A table that 0002 depends on, so applying out of order fails.
CREATE TABLE fixture_items (
    id   int PRIMARY KEY,
    note text NOT NULL
);
