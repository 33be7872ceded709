-- Check and take every limit of one request atomically: all pass and are taken, or none is.
-- KEYS[i]: the key of check i (all share one {team} hash tag, so this runs on Redis Cluster).
-- ARGV[i]: check i as one string of 4 fields separated by \31 (one argument per check keeps the
-- gateway's encoding cheap): kind, limit, rate_or_member, cost_or_stale_ms_or_ends_ms
--   kind "b" token bucket: limit = capacity, rate = refill per second, cost = tokens to take
--   kind "p" parallel:     limit = max members, member = request id, stale_ms = forget after
--   kind "q" budget:       limit = ceiling; denied when the counter has reached it; ends_ms = the
--                          window's end (Unix ms), so a refusal retries after ends_ms - now
-- Returns {failed_index (0 = admitted), retry_after_ms, remaining_1, reset_ms_1, ...}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = #KEYS
local out = {0, 0}
local state = {}
local spec = {}
for i = 1, n do
  local kind, a, b, c = string.match(ARGV[i], "^([^\31]+)\31([^\31]+)\31([^\31]+)\31([^\31]+)$")
  spec[i] = {kind, a, b, c}
end
for i = 1, n do
  local kind = spec[i][1]
  local limit = tonumber(spec[i][2])
  if kind == 'b' then
    local rate = tonumber(spec[i][3]) / 1000.0
    local cost = tonumber(spec[i][4])
    local v = redis.call('HMGET', KEYS[i], 't', 'ts')
    local tokens = tonumber(v[1]) or limit
    local ts = tonumber(v[2]) or now
    tokens = math.min(limit, tokens + math.max(0, now - ts) * rate)
    state[i] = tokens
    if tokens < cost and out[1] == 0 then
      out[1] = i
      if cost > limit then out[2] = -1 else out[2] = math.ceil((cost - tokens) / rate) end
    end
    local left = tokens - cost
    if left < 0 then left = tokens end
    out[#out + 1] = math.floor(left)
    out[#out + 1] = math.ceil((limit - left) / rate)
  elseif kind == 'p' then
    local stale = tonumber(spec[i][4])
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - stale)
    local count = redis.call('ZCARD', KEYS[i])
    if count >= limit and out[1] == 0 then
      out[1] = i
      out[2] = 1000
    end
    out[#out + 1] = math.max(0, limit - count - 1)
    out[#out + 1] = 0
  else
    local used = tonumber(redis.call('GET', KEYS[i]) or '0')
    if used >= limit and out[1] == 0 then
      out[1] = i
      out[2] = math.max(0, tonumber(spec[i][4]) - now) -- until the window's end
    end
    out[#out + 1] = math.floor(math.max(0, limit - used))
    out[#out + 1] = 0
  end
end
if out[1] ~= 0 then return out end
for i = 1, n do
  local kind = spec[i][1]
  if kind == 'b' then
    local limit = tonumber(spec[i][2])
    local rate = tonumber(spec[i][3]) / 1000.0
    local left = state[i] - tonumber(spec[i][4])
    redis.call('HSET', KEYS[i], 't', tostring(left), 'ts', now)
    redis.call('PEXPIRE', KEYS[i], math.ceil((limit - left) / rate) + 1000)
  elseif kind == 'p' then
    redis.call('ZADD', KEYS[i], now, spec[i][3])
    redis.call('PEXPIRE', KEYS[i], tonumber(spec[i][4]))
  end
end
return out
