-- Settle a finished request in one round trip, exactly once.
-- KEYS[1]: a hash of the settlements recently run (one per hash tag and minute); ARGV[1]: this
-- settlement's id and how long the hash is kept (ms), separated by \31. A settlement whose reply was
-- lost is replayed by the gateway with the same id: if it had run, it is skipped (-1).
-- From 2 on, ARGV[i] pairs with KEYS[i]: one string of fields separated by \31 (one argument per
-- step keeps the gateway's encoding cheap):
--   b capacity rate delta                    adjust a token bucket (>0 takes, <0 refunds, capped)
--   p member                                 release a parallel slot
--   i amount ttl_s                           add to a counter (budgets), keep it ttl_s
--   u model prompt completion cost ttl_s     one request in the usage report (a hash), keep it ttl_s
local id, keep = string.match(ARGV[1], "^([^\31]+)\31([^\31]+)$")
if redis.call('HSETNX', KEYS[1], id, '1') == 0 then
  return -1
end
redis.call('PEXPIRE', KEYS[1], keep)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 2, #KEYS do
  local f = {}
  for v in string.gmatch(ARGV[i], "[^\31]+") do f[#f + 1] = v end
  local kind = f[1]
  if kind == 'b' then
    local limit = tonumber(f[2])
    local rate = tonumber(f[3]) / 1000.0
    local v = redis.call('HMGET', KEYS[i], 't', 'ts')
    local tokens = tonumber(v[1]) or limit
    local ts = tonumber(v[2]) or now
    tokens = math.min(limit, tokens + math.max(0, now - ts) * rate)
    tokens = math.min(limit, tokens - tonumber(f[4]))
    redis.call('HSET', KEYS[i], 't', tostring(tokens), 'ts', now)
    redis.call('PEXPIRE', KEYS[i], math.ceil((limit - tokens) / rate) + 1000)
  elseif kind == 'p' then
    redis.call('ZREM', KEYS[i], f[2])
  elseif kind == 'i' then
    redis.call('INCRBYFLOAT', KEYS[i], f[2])
    redis.call('EXPIRE', KEYS[i], tonumber(f[3]))
  else
    local model = f[2]
    redis.call('HINCRBYFLOAT', KEYS[i], model .. '|requests', 1)
    if f[3] ~= '0' then redis.call('HINCRBYFLOAT', KEYS[i], model .. '|prompt_tokens', f[3]) end
    if f[4] ~= '0' then redis.call('HINCRBYFLOAT', KEYS[i], model .. '|completion_tokens', f[4]) end
    if f[5] ~= '0' then redis.call('HINCRBYFLOAT', KEYS[i], model .. '|cost_usd', f[5]) end
    redis.call('EXPIRE', KEYS[i], tonumber(f[6]))
  end
end
return #KEYS - 1
