-- Settle a finished request in one round trip. KEYS[i] pairs with 4 ARGV values:
--   "b" key capacity rate delta : adjust a token bucket by delta (>0 takes, <0 refunds, capped)
--   "p" key member -  -         : release a parallel slot
--   "i" key amount ttl_s -      : add to a counter (budgets), keep it ttl_s
--   "h" key field amount ttl_s  : add to a hash field (usage report), keep it ttl_s
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 1, #KEYS do
  local kind, a, b, c = ARGV[i * 4 - 3], ARGV[i * 4 - 2], ARGV[i * 4 - 1], ARGV[i * 4]
  if kind == 'b' then
    local limit = tonumber(a)
    local rate = tonumber(b) / 1000.0
    local v = redis.call('HMGET', KEYS[i], 't', 'ts')
    local tokens = tonumber(v[1]) or limit
    local ts = tonumber(v[2]) or now
    tokens = math.min(limit, tokens + math.max(0, now - ts) * rate)
    tokens = math.min(limit, tokens - tonumber(c))
    redis.call('HSET', KEYS[i], 't', tostring(tokens), 'ts', now)
    redis.call('PEXPIRE', KEYS[i], math.ceil((limit - tokens) / rate) + 1000)
  elseif kind == 'p' then
    redis.call('ZREM', KEYS[i], a)
  elseif kind == 'i' then
    redis.call('INCRBYFLOAT', KEYS[i], a)
    redis.call('EXPIRE', KEYS[i], tonumber(b))
  else
    redis.call('HINCRBYFLOAT', KEYS[i], a, b)
    redis.call('EXPIRE', KEYS[i], tonumber(c))
  end
end
return #KEYS
