ALTER TABLE fixture_items ADD COLUMN tag text NOT NULL DEFAULT 'none';
INSERT INTO fixture_items (id, note) VALUES (1, 'seeded once');
