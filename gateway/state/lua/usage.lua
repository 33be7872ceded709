-- Read a usage report's days in one call: the hash at each of KEYS, in order (an empty list for a
-- day with nothing booked). KEYS share the team's {hash tag}, so this runs on one Redis Cluster master.
-- One command instead of one HGETALL each: one round trip, and a reply the client parses in one go.
local out = {}
for i, key in ipairs(KEYS) do
  out[i] = redis.call('HGETALL', key)
end
return out
